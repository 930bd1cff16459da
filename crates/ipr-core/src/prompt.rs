//! The SR2D prompt grammar: produce and parse prompts over any vocabulary.
//!
//! Forms (articles and plurals from the [`Vocabulary`]):
//! - spatial: "a {A} {relation} a {B}"  ("a kite to the right of a bicycle")
//! - and:     "a {A} and a {B}"
//! - single:  "a {A}"
//! - count:   count phrases joined by " and ": "2 benches and a dog", "3 cats", "0 dogs".
//!
//! Parsing is the exact inverse of rendering: `parse(render(p)) == p` for every prompt whose
//! count form is canonical (see [`Prompt::canonical`]). Object names are matched whole, never
//! as substrings, so "a hot dog below a dog", "a teddy bear above a bear" and "a carrot to the
//! left of a car" parse correctly; every split of the text is tried and an ambiguous text is an
//! error rather than a guess.

use crate::relation::Relation;
use crate::vocab::{ObjectId, Vocabulary};

/// A prompt in the SR2D grammar, as object ids of a vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Prompt {
    /// "a {a} {relation} a {b}"
    Spatial { a: ObjectId, relation: Relation, b: ObjectId },
    /// "a {a} and a {b}"
    And { a: ObjectId, b: ObjectId },
    /// "a {a}"
    Single { a: ObjectId },
    /// Count phrases joined by " and ", in order: [(dog, 2), (cat, 1)] -> "2 dogs and a cat".
    Count { counts: Vec<(ObjectId, u32)> },
}

impl Prompt {
    /// The prompt's text.
    pub fn render(&self, vocab: &Vocabulary) -> String {
        match self {
            Prompt::Spatial { a, relation, b } => {
                format!("{} {} {}", vocab.with_article(*a), relation.phrase(), vocab.with_article(*b))
            }
            Prompt::And { a, b } => {
                format!("{} and {}", vocab.with_article(*a), vocab.with_article(*b))
            }
            Prompt::Single { a } => vocab.with_article(*a),
            Prompt::Count { counts } => {
                counts.iter().map(|&(id, n)| vocab.count_phrase(id, n)).collect::<Vec<_>>().join(" and ")
            }
        }
    }

    /// The same prompt in the form `parse` returns: a count caption of one object once
    /// ("a dog") is `Single`, of two objects once each ("a dog and a cat") is `And`.
    pub fn canonical(self) -> Prompt {
        match self {
            Prompt::Count { counts } => match counts.as_slice() {
                [(a, 1)] => Prompt::Single { a: *a },
                [(a, 1), (b, 1)] => Prompt::And { a: *a, b: *b },
                _ => Prompt::Count { counts },
            },
            p => p,
        }
    }

    /// The objects the prompt names, in order of mention.
    pub fn objects(&self) -> Vec<ObjectId> {
        match self {
            Prompt::Spatial { a, b, .. } | Prompt::And { a, b } => vec![*a, *b],
            Prompt::Single { a } => vec![*a],
            Prompt::Count { counts } => counts.iter().map(|(id, _)| *id).collect(),
        }
    }

    /// The relation of a spatial prompt.
    pub fn relation(&self) -> Option<Relation> {
        match self {
            Prompt::Spatial { relation, .. } => Some(*relation),
            _ => None,
        }
    }

    /// Parse `text` over `vocab`. Errors say why the text is not in the grammar.
    pub fn parse(text: &str, vocab: &Vocabulary) -> Result<Prompt, String> {
        let mut found: Vec<Prompt> = Vec::new();
        let mut push = |p: Prompt| {
            if !found.contains(&p) {
                found.push(p)
            }
        };
        for relation in Relation::ALL {
            let sep = format!(" {} ", relation.phrase());
            for (left, right) in splits(text, &sep) {
                if let (Some(a), Some(b)) = (singular_phrase(left, vocab), singular_phrase(right, vocab)) {
                    push(Prompt::Spatial { a, relation, b });
                }
            }
        }
        // Count phrases separated by " and "; with a name that itself contains " and ", several
        // segmentations are possible, so all are tried.
        for counts in count_segmentations(text, vocab) {
            push(Prompt::Count { counts }.canonical());
        }
        match found.len() {
            1 => Ok(found.pop().expect("one parse")),
            0 => Err(format!(
                "prompt {text:?} is not in the SR2D grammar over this vocabulary: expected \"a A <relation> a B\", \"a A and a B\", \"a A\" or count phrases like \"2 As and a B\""
            )),
            _ => Err(format!("prompt {text:?} is ambiguous over this vocabulary: it parses as {found:?}")),
        }
    }
}

/// Every way to cut `text` at one occurrence of `sep`.
fn splits<'a>(text: &'a str, sep: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
    text.match_indices(sep).map(move |(i, _)| (&text[..i], &text[i + sep.len()..]))
}

/// "a dog" / "an apple" -> the object, if the article is the one the vocabulary uses.
fn singular_phrase(phrase: &str, vocab: &Vocabulary) -> Option<ObjectId> {
    let (article, name) = phrase.split_once(' ')?;
    let id = vocab.id(name)?;
    (vocab.object(id).article == article).then_some(id)
}

/// "a dog" -> (dog, 1); "2 dogs" -> (dog, 2). Numbers are canonical decimal (no sign, no
/// leading zeros) other than 1, which is written with the article.
fn count_phrase(phrase: &str, vocab: &Vocabulary) -> Option<(ObjectId, u32)> {
    if let Some(id) = singular_phrase(phrase, vocab) {
        return Some((id, 1));
    }
    let (number, plural) = phrase.split_once(' ')?;
    let canonical =
        !number.is_empty() && number.bytes().all(|c| c.is_ascii_digit()) && (number == "0" || !number.starts_with('0'));
    let n: u32 = number.parse().ok().filter(|n| canonical && *n != 1)?;
    Some((vocab.id_of_plural(plural)?, n))
}

fn count_segmentations(text: &str, vocab: &Vocabulary) -> Vec<Vec<(ObjectId, u32)>> {
    let mut out = Vec::new();
    if let Some(c) = count_phrase(text, vocab) {
        out.push(vec![c]);
    }
    for (head, tail) in splits(text, " and ") {
        if let Some(c) = count_phrase(head, vocab) {
            for mut rest in count_segmentations(tail, vocab) {
                rest.insert(0, c);
                out.push(rest);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn coco() -> Vocabulary {
        Vocabulary::coco80()
    }

    #[test]
    fn renders_each_form() {
        let v = coco();
        let id = |n| v.id(n).unwrap();
        let kite = Prompt::Spatial { a: id("kite"), relation: Relation::RightOf, b: id("bicycle") };
        assert_eq!(kite.render(&v), "a kite to the right of a bicycle");
        assert_eq!(Prompt::And { a: id("apple"), b: id("oven") }.render(&v), "an apple and an oven");
        assert_eq!(Prompt::Single { a: id("umbrella") }.render(&v), "an umbrella");
        let count = Prompt::Count { counts: vec![(id("bench"), 2), (id("dog"), 1)] };
        assert_eq!(count.render(&v), "2 benches and a dog");
        assert_eq!(Prompt::Count { counts: vec![(id("mouse"), 0)] }.render(&v), "0 mice");
    }

    #[test]
    fn names_containing_names() {
        let v = coco();
        let id = |n| v.id(n).unwrap();
        for (text, want) in [
            ("a hot dog below a dog", Prompt::Spatial { a: id("hot dog"), relation: Relation::Below, b: id("dog") }),
            ("a dog above a hot dog", Prompt::Spatial { a: id("dog"), relation: Relation::Above, b: id("hot dog") }),
            (
                "a teddy bear to the left of a bear",
                Prompt::Spatial { a: id("teddy bear"), relation: Relation::LeftOf, b: id("bear") },
            ),
            (
                "a carrot to the right of a car",
                Prompt::Spatial { a: id("carrot"), relation: Relation::RightOf, b: id("car") },
            ),
            ("a car and a carrot", Prompt::And { a: id("car"), b: id("carrot") }),
            ("2 hot dogs and 3 dogs", Prompt::Count { counts: vec![(id("hot dog"), 2), (id("dog"), 3)] }),
        ] {
            assert_eq!(Prompt::parse(text, &v).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn rejects_what_is_not_in_the_grammar() {
        let v = coco();
        for bad in [
            "a apple",                     // wrong article
            "an dog",                      // wrong article
            "a dog beside a cat",          // unknown relation
            "2 dog",                       // not plural
            "1 dog",                       // 1 is written "a dog"
            "02 dogs",                     // not canonical
            "a unicorn",                   // not in the vocabulary
            "a dog to the left of a cat ", // trailing space
            "",
        ] {
            let e = Prompt::parse(bad, &v).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn ambiguity_is_an_error() {
        // "a salt and a pepper" is one object's name and also two objects.
        let v = Vocabulary::new(["salt", "pepper", "salt and a pepper", "dog"]).unwrap();
        let e = Prompt::parse("a salt and a pepper", &v).unwrap_err();
        assert!(e.contains("ambiguous"), "{e}");
        // A name containing " and " is fine where only one segmentation exists.
        let v = Vocabulary::new(["salt and pepper", "dog"]).unwrap();
        let want = Prompt::And { a: 0, b: 1 };
        assert_eq!(Prompt::parse("a salt and pepper and a dog", &v), Ok(want));
    }

    /// Random vocabularies of lower-case words, some of which contain others.
    fn vocab_strategy() -> impl Strategy<Value = Vocabulary> {
        let word = "[a-z]{1,6}";
        let name = prop::collection::vec(word, 1..3).prop_map(|w| w.join(" "));
        prop::collection::vec(name, 2..12).prop_filter_map("valid vocabulary", |mut names| {
            // Add names that contain other names, the hard case for a parser.
            names.push(format!("{} {}", names[0], names[1]));
            names.push(format!("{}{}", names[0], names[1]));
            names.sort();
            names.dedup();
            // Words that collide with the grammar's own words make texts ambiguous by design.
            if names.iter().any(|n| {
                n.split(' ')
                    .any(|w| ["a", "an", "and", "to", "the", "left", "right", "of", "above", "below"].contains(&w))
            }) {
                return None;
            }
            Vocabulary::new(names).ok()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn parse_inverts_render(v in vocab_strategy(), picks in prop::collection::vec((0usize..1000, 0usize..1000, 0usize..4, 0u32..5), 1..20)) {
            for (i, j, r, n) in picks {
                let (a, b) = (i % v.len(), j % v.len());
                let prompts = [
                    Prompt::Spatial { a, relation: Relation::ALL[r], b },
                    Prompt::And { a, b },
                    Prompt::Single { a },
                    Prompt::Count { counts: vec![(a, n), (b, n + 2)] }.canonical(),
                ];
                for p in prompts {
                    let text = p.render(&v);
                    prop_assert_eq!(Prompt::parse(&text, &v), Ok(p.clone()), "{}", text);
                }
            }
        }
    }
}

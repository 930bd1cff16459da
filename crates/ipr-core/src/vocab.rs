//! Object vocabularies: class names with their article and plural.
//!
//! SR2D uses the 80 COCO class names and the `inflect` package's indefinite article
//! ("an airplane", "a hair drier", "a tv"). Count captions need plurals ("2 benches", "2 mice"),
//! which the public IPR code never produced ("2 bench"). Both come from rules plus a small table
//! of exceptions; a vocabulary may also set them per word.

use std::collections::HashMap;

/// Index of an object class in its [`Vocabulary`].
pub type ObjectId = usize;

/// The 80 COCO class names in the standard order (VISOR's `create_spatial_phrases.py`).
pub const COCO80: [&str; 80] = [
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
];

/// One class: its name, the indefinite article used before it, and its plural.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectName {
    pub name: String,
    pub article: &'static str,
    pub plural: String,
}

/// An ordered set of class names; ids are positions.
#[derive(Debug, Clone)]
pub struct Vocabulary {
    objects: Vec<ObjectName>,
    by_name: HashMap<String, ObjectId>,
    by_plural: HashMap<String, ObjectId>,
}

impl Vocabulary {
    /// A vocabulary from names, with articles and plurals from the rules. Names must be
    /// non-empty, unique, lower case words separated by single spaces.
    pub fn new<I, S>(names: I) -> Result<Self, String>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let objects = names
            .into_iter()
            .map(|n| {
                let name = n.into();
                let article = indefinite_article(&name);
                let plural = plural(&name);
                ObjectName { name, article, plural }
            })
            .collect();
        Self::from_objects(objects)
    }

    /// A vocabulary with explicit articles and plurals.
    pub fn from_objects(objects: Vec<ObjectName>) -> Result<Self, String> {
        if objects.is_empty() {
            return Err("vocabulary is empty".into());
        }
        let mut by_name = HashMap::new();
        let mut by_plural = HashMap::new();
        for (id, o) in objects.iter().enumerate() {
            validate_name(&o.name)?;
            validate_name(&o.plural).map_err(|e| format!("plural of {:?}: {e}", o.name))?;
            if !matches!(o.article, "a" | "an") {
                return Err(format!("article of {:?} is {:?}, expected \"a\" or \"an\"", o.name, o.article));
            }
            if by_name.insert(o.name.clone(), id).is_some() {
                return Err(format!("object name {:?} appears twice in the vocabulary", o.name));
            }
            // Count captions are parsed through the plural, so it must name one class only.
            if let Some(other) = by_plural.insert(o.plural.clone(), id) {
                return Err(format!(
                    "object names {:?} and {:?} share the plural {:?}",
                    objects[other].name, o.name, o.plural
                ));
            }
        }
        Ok(Self { objects, by_name, by_plural })
    }

    /// The COCO-80 vocabulary of SR2D.
    pub fn coco80() -> Self {
        Self::new(COCO80).expect("COCO-80 names are valid")
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    pub fn objects(&self) -> &[ObjectName] {
        &self.objects
    }

    pub fn id(&self, name: &str) -> Option<ObjectId> {
        self.by_name.get(name).copied()
    }

    /// The class whose plural is `plural`.
    pub fn id_of_plural(&self, plural: &str) -> Option<ObjectId> {
        self.by_plural.get(plural).copied()
    }

    /// The id of `name`, or an error listing what was expected.
    pub fn require(&self, name: &str) -> Result<ObjectId, String> {
        self.id(name)
            .ok_or_else(|| format!("unknown object name {name:?}: not in the vocabulary ({} names)", self.len()))
    }

    pub fn name(&self, id: ObjectId) -> &str {
        &self.objects[id].name
    }

    pub fn object(&self, id: ObjectId) -> &ObjectName {
        &self.objects[id]
    }

    /// "a dog", "an apple".
    pub fn with_article(&self, id: ObjectId) -> String {
        let o = &self.objects[id];
        format!("{} {}", o.article, o.name)
    }

    /// A grammatical count phrase: "a dog" for 1, "2 dogs", "0 dogs".
    pub fn count_phrase(&self, id: ObjectId, n: u32) -> String {
        if n == 1 {
            self.with_article(id)
        } else {
            format!("{n} {}", self.objects[id].plural)
        }
    }
}

fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("object name is empty".into());
    }
    if name.split(' ').any(str::is_empty) {
        return Err(format!("object name {name:?} has leading, trailing or double spaces"));
    }
    if name.chars().any(|c| c.is_uppercase() || c.is_control()) {
        return Err(format!("object name {name:?} must be lower case without control characters"));
    }
    Ok(())
}

/// The indefinite article by the rules `inflect` applies to ordinary nouns: "an" before a
/// vowel sound. Covers the silent h ("an hour") and the "you"/"wun" sounds ("a unicorn",
/// "a one-way sign", "a euro").
pub fn indefinite_article(name: &str) -> &'static str {
    let w = name.split(' ').next().unwrap_or("");
    const AN_SILENT_H: [&str; 4] = ["hour", "honest", "honor", "heir"];
    const A_BEFORE_VOWEL: [&str; 10] = ["uni", "use", "usu", "uti", "ura", "ure", "eu", "ewe", "one", "once"];
    if AN_SILENT_H.iter().any(|p| w.starts_with(p)) {
        return "an";
    }
    if A_BEFORE_VOWEL.iter().any(|p| w.starts_with(p)) || w == "u" {
        return "a";
    }
    match w.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    }
}

/// The plural of a class name: its last word is inflected ("wine glass" -> "wine glasses").
pub fn plural(name: &str) -> String {
    let (head, last) = match name.rfind(' ') {
        Some(i) => (&name[..=i], &name[i + 1..]),
        None => ("", name),
    };
    format!("{head}{}", plural_word(last))
}

fn plural_word(w: &str) -> String {
    const IRREGULAR: [(&str, &str); 12] = [
        ("person", "people"),
        ("mouse", "mice"),
        ("man", "men"),
        ("woman", "women"),
        ("child", "children"),
        ("foot", "feet"),
        ("tooth", "teeth"),
        ("goose", "geese"),
        ("knife", "knives"),
        ("leaf", "leaves"),
        ("wolf", "wolves"),
        ("loaf", "loaves"),
    ];
    // Nouns that are already plural or do not change.
    const INVARIANT: [&str; 8] = ["sheep", "deer", "fish", "scissors", "skis", "broccoli", "glasses", "pants"];
    if let Some((_, p)) = IRREGULAR.iter().find(|(s, _)| *s == w) {
        return (*p).to_string();
    }
    if INVARIANT.contains(&w) {
        return w.to_string();
    }
    let ends = |s: &str| w.ends_with(s);
    if ends("s") || ends("x") || ends("z") || ends("ch") || ends("sh") {
        return format!("{w}es");
    }
    if ends("y") && w.len() > 1 && !matches!(w.as_bytes()[w.len() - 2], b'a' | b'e' | b'i' | b'o' | b'u') {
        return format!("{}ies", &w[..w.len() - 1]);
    }
    if ends("fe") {
        return format!("{}ves", &w[..w.len() - 2]);
    }
    format!("{w}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coco_articles_match_inflect() {
        let v = Vocabulary::coco80();
        let an: Vec<&str> = v.objects().iter().filter(|o| o.article == "an").map(|o| o.name.as_str()).collect();
        assert_eq!(an, ["airplane", "elephant", "umbrella", "apple", "orange", "oven"]);
        assert_eq!(v.with_article(v.id("hair drier").unwrap()), "a hair drier");
        assert_eq!(v.with_article(v.id("tv").unwrap()), "a tv");
        assert_eq!(v.with_article(v.id("hot dog").unwrap()), "a hot dog");
    }

    #[test]
    fn plurals() {
        for (s, p) in [
            ("bench", "benches"),
            ("bus", "buses"),
            ("couch", "couches"),
            ("wine glass", "wine glasses"),
            ("knife", "knives"),
            ("mouse", "mice"),
            ("person", "people"),
            ("sheep", "sheep"),
            ("scissors", "scissors"),
            ("skis", "skis"),
            ("toothbrush", "toothbrushes"),
            ("sandwich", "sandwiches"),
            ("teddy bear", "teddy bears"),
            ("tv", "tvs"),
            ("hair drier", "hair driers"),
            ("cherry", "cherries"),
            ("toy", "toys"),
            ("box", "boxes"),
        ] {
            assert_eq!(plural(s), p, "plural of {s}");
        }
    }

    #[test]
    fn count_phrases() {
        let v = Vocabulary::coco80();
        let apple = v.id("apple").unwrap();
        assert_eq!(v.count_phrase(apple, 1), "an apple");
        assert_eq!(v.count_phrase(apple, 3), "3 apples");
        assert_eq!(v.count_phrase(v.id("bench").unwrap(), 2), "2 benches");
    }

    #[test]
    fn other_articles() {
        for (w, a) in
            [("unicorn", "a"), ("hour glass", "an"), ("egg", "an"), ("euro", "a"), ("ice cube", "an"), ("house", "a")]
        {
            assert_eq!(indefinite_article(w), a, "{w}");
        }
    }

    #[test]
    fn rejects_bad_vocabularies() {
        assert!(Vocabulary::new(Vec::<String>::new()).is_err());
        assert!(Vocabulary::new(["dog", "dog"]).unwrap_err().contains("twice"));
        assert!(Vocabulary::new(["hot  dog"]).unwrap_err().contains("double"));
        assert!(Vocabulary::new(["Dog"]).unwrap_err().contains("lower case"));
        assert!(Vocabulary::coco80().require("unicorn").unwrap_err().contains("unicorn"));
    }
}

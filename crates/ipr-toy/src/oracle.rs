//! The oracle: a perfect "model" that draws exactly what a prompt says.
//!
//! For any prompt of the toy grammar it renders a scene that satisfies it: a spatial prompt
//! gets an unambiguous spatial scene, "a A and a B" two objects in a random relation, a count
//! caption exactly those objects. It is the upper bound of every metric (with the exact
//! detector: OA 100, VISOR 100), the reference column of `ipr toy grid`, and a stand-in
//! sampler for testing the evaluation and relabeling stages end to end without a model.

use crate::render::render;
use crate::world::Scene;
use image::RgbImage;
use ipr_core::{Prompt, Relation, Vocabulary};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Most objects the oracle places: more do not reliably fit on the 32 px canvas at the
/// world's sizes and gaps.
pub const MAX_OBJECTS: u32 = 4;

/// A scene that satisfies `prompt`, drawn from `rng`.
pub fn scene_for<R: Rng + ?Sized>(prompt: &Prompt, rng: &mut R) -> Result<Scene, String> {
    Ok(match prompt {
        Prompt::Spatial { a, relation, b } => Scene::spatial(*a, *relation, *b, rng),
        Prompt::And { a, b } => Scene::spatial(*a, Relation::ALL[rng.random_range(0..4)], *b, rng),
        Prompt::Single { a } => Scene::single(*a, rng),
        Prompt::Count { counts } => {
            let total: u32 = counts.iter().map(|(_, n)| n).sum();
            if total > MAX_OBJECTS {
                return Err(format!("a count prompt of {total} objects: the oracle draws at most {MAX_OBJECTS}"));
            }
            let classes: Vec<_> = counts.iter().flat_map(|&(c, n)| std::iter::repeat_n(c, n as usize)).collect();
            Scene::with_classes(&classes, rng)
        }
    })
}

/// The oracle's image number `index` for `prompt`: a function of `(seed, prompt text, index)`.
pub fn oracle_image(prompt: &Prompt, vocab: &Vocabulary, seed: u64, index: u64) -> Result<(Scene, RgbImage), String> {
    // Seed from the prompt's text so that each prompt has its own images whatever the list
    // it comes in (FNV-1a of the text, mixed with the seed).
    let h = prompt
        .render(vocab)
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64 ^ seed, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let mut rng = ChaCha8Rng::seed_from_u64(h);
    rng.set_stream(index);
    let scene = scene_for(prompt, &mut rng)?;
    let image = render(&scene);
    Ok((scene, image))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classes::vocabulary;
    use crate::split::sr2d_rows;

    #[test]
    fn draws_what_every_toy_prompt_says() {
        let v = vocabulary();
        for row in sr2d_rows() {
            let p = row.prompt(&v).unwrap();
            for k in 0..4 {
                let (scene, _) = oracle_image(&p, &v, 0, k).unwrap();
                let mut classes: Vec<_> = scene.objects.iter().map(|o| o.class).collect();
                let mut named = p.objects();
                classes.sort();
                named.sort();
                assert_eq!(classes, named, "{}", row.text);
                if let Prompt::Spatial { relation, .. } = p {
                    let (a, b) = (&scene.objects[0], &scene.objects[1]);
                    assert!(relation.holds(a.center(), b.center()), "{}", row.text);
                }
            }
        }
        let count = Prompt::Count { counts: vec![(0, 2), (5, 1)] };
        let (scene, _) = oracle_image(&count, &v, 0, 0).unwrap();
        assert_eq!((scene.count(0), scene.count(5), scene.objects.len()), (2, 1, 3));
        let too_many = Prompt::Count { counts: vec![(0, 5)] };
        assert!(oracle_image(&too_many, &v, 0, 0).unwrap_err().contains("5 objects"));
    }

    #[test]
    fn images_are_a_function_of_seed_prompt_and_index() {
        let v = vocabulary();
        let p = Prompt::Spatial { a: 1, relation: Relation::Above, b: 4 };
        let q = Prompt::Spatial { a: 4, relation: Relation::Above, b: 1 };
        assert_eq!(oracle_image(&p, &v, 3, 2).unwrap(), oracle_image(&p, &v, 3, 2).unwrap());
        assert_ne!(oracle_image(&p, &v, 3, 2).unwrap().1, oracle_image(&p, &v, 3, 1).unwrap().1);
        assert_ne!(oracle_image(&p, &v, 3, 2).unwrap().1, oracle_image(&p, &v, 4, 2).unwrap().1);
        assert_ne!(oracle_image(&p, &v, 3, 2).unwrap().1, oracle_image(&q, &v, 3, 2).unwrap().1);
    }
}

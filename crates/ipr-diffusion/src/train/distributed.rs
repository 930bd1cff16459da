//! The gradient exchange of data-parallel training: every rank's pieces of a micro-batch, with
//! their losses and gradients, on every rank, in piece order.
//!
//! Gathered, not reduced (see [`crate::collective`]): the caller sums the pieces in piece order,
//! the same additions in the same order as one process computing every piece, so the adapter's
//! bits do not depend on how many ranks computed them. LoRA gradients are a few MB, so sending
//! every piece instead of a sum costs little; full fine-tuning of a large UNet would want a
//! reduce-scatter instead.
//!
//! Wire format, per rank, `per_rank` fixed-size slots (a rank with fewer pieces, when the batch is
//! smaller than the number of pieces, sends empty slots): host f64 values `[present, loss,
//! has_grad(param_0), ..., has_grad(param_{m-1})]` per slot, and one 1-D f32 tensor on the
//! training device with every slot's gradients, parameter after parameter in `params` order
//! (zeros where there is none), gathered by [`Collective::all_gather_tensor`] (NCCL on GPUs).

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use crate::collective::Collective;
use crate::error::{Error, Result};

/// One piece's loss and gradients by parameter name.
pub type Piece = (f64, HashMap<String, Tensor>);

/// All ranks' pieces in piece order (rank 0's first), from this rank's `mine` (at most
/// `per_rank` pieces). Gradients come back in their parameter's dtype, on its device.
pub fn gather_pieces(
    world: &dyn Collective,
    mine: Vec<Piece>,
    per_rank: usize,
    params: &[(String, Var)],
) -> Result<Vec<Piece>> {
    if mine.len() > per_rank {
        return Err(Error::Input(format!("{} pieces on one rank, expected at most {per_rank}", mine.len())));
    }
    let m = params.len();
    let numels: Vec<usize> = params.iter().map(|(_, v)| v.as_tensor().elem_count()).collect();
    let slot_len: usize = numels.iter().sum();
    let device = match params.first() {
        Some((_, v)) => v.device().clone(),
        None => return Err(Error::Input("no trainable parameters to exchange gradients of".into())),
    };
    let mut meta = Vec::with_capacity(per_rank * (2 + m));
    let mut flat = Vec::with_capacity(per_rank * m);
    for slot in 0..per_rank {
        let piece = mine.get(slot);
        meta.push(if piece.is_some() { 1.0 } else { 0.0 });
        meta.push(piece.map_or(0.0, |(loss, _)| *loss));
        for ((name, _), &n) in params.iter().zip(&numels) {
            let g = piece.and_then(|(_, g)| g.get(name));
            meta.push(if g.is_some() { 1.0 } else { 0.0 });
            flat.push(match g {
                Some(g) => g.flatten_all()?.to_dtype(DType::F32)?,
                None => Tensor::zeros(n, DType::F32, &device)?,
            });
        }
    }
    let flat = if flat.is_empty() { Tensor::zeros(0, DType::F32, &device)? } else { Tensor::cat(&flat, 0)? };
    let all_meta = world.all_gather_f64(&meta)?;
    let all_flat = world.all_gather_tensor(&flat)?;
    let slots = world.size() * per_rank;
    if all_meta.len() != slots * (2 + m) || all_flat.elem_count() != slots * slot_len {
        return Err(Error::Input(format!(
            "gradient exchange: got {} values and {} gradient entries from {} ranks, expected {} and {} \
             (do all ranks train the same adapters?)",
            all_meta.len(),
            all_flat.elem_count(),
            world.size(),
            slots * (2 + m),
            slots * slot_len
        )));
    }
    let mut out = Vec::new();
    for (q, meta) in all_meta.chunks(2 + m).enumerate() {
        if meta[0] == 0.0 {
            continue;
        }
        let mut grads = HashMap::new();
        let mut offset = q * slot_len;
        for (((name, var), &n), &has) in params.iter().zip(&numels).zip(&meta[2..]) {
            if has != 0.0 {
                let g = all_flat.narrow(0, offset, n)?.reshape(var.shape())?.to_dtype(var.dtype())?.contiguous()?;
                grads.insert(name.clone(), g);
            }
            offset += n;
        }
        out.push((meta[1], grads));
    }
    Ok(out)
}

//! Multistep DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
//! Diffusion Probabilistic Models", algorithm 2, "DPM-Solver++(2M)"), as diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"`.
//!
//! With the sigmas of the Euler sampler, `sigma = sqrt((1 - a) / a)` at the inference timesteps
//! and a final 0, the VP coefficients are `alpha_i = 1 / sqrt(sigma_i^2 + 1)`,
//! `sigma_t_i = sigma_i * alpha_i`, the half log-SNR `lambda_i = log(alpha_i / sigma_t_i) =
//! -log(sigma_i)`, and the step size `h = lambda_{i+1} - lambda_i`, so `exp(-h) = sigma_{i+1} /
//! sigma_i`. The model output is turned into the data prediction `D0 = x0_i`; then
//!
//! - first order (DDIM in lambda): `x_{i+1} = (sigma_t_{i+1} / sigma_t_i) x_i + alpha_{i+1} (1 -
//!   exp(-h)) D0`;
//! - second order, reusing the previous step's `x0_{i-1}`: `r = h_{i-1} / h`, `D1 = (x0_i -
//!   x0_{i-1}) / r`, and the first-order update plus `alpha_{i+1} (1 - exp(-h)) D1 / 2`
//!   ("midpoint", the paper's algorithm 2) or `alpha_{i+1} ((exp(-h) - 1) / h + 1) D1` ("heun").
//!
//! The first step has no previous prediction and is first order; so is the last one when
//! `final_sigmas_type` is "zero" (`sigma_{n} = 0`, `h` infinite), `euler_at_final` is set, or
//! `lower_order_final` is set and there are fewer than 15 steps.

use std::path::Path;

use candle_core::Tensor;

use super::{alphas_cumprod, betas, round_half_even, BaseSchedule, PredictionType, TimestepSpacing};
use crate::config::SchedulerConfig;
use crate::error::{Error, Result};

/// The second-order update (diffusers' `solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    Midpoint,
    Heun,
}

/// The sigma after the last step (diffusers' `final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigma {
    /// 0: the last step lands on the data prediction.
    Zero,
    /// The sigma of training timestep 0.
    SigmaMin,
}

/// `DPMSolverMultistepScheduler`'s configuration with its defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct DpmSolverMultistepConfig {
    pub base: BaseSchedule,
    /// 1 or 2 (default 2).
    pub solver_order: usize,
    pub solver_type: SolverType,
    /// First order at the last step when there are fewer than 15 steps (default true).
    pub lower_order_final: bool,
    /// First order at the last step always (default false).
    pub euler_at_final: bool,
    pub final_sigma: FinalSigma,
    /// Timesteps whose lambda falls below this are not used (default -inf: none dropped).
    pub lambda_min_clipped: f64,
}

impl DpmSolverMultistepConfig {
    /// `DPMSolverMultistepScheduler.from_config(c)`: the file's keys, DPM-Solver's defaults for the
    /// others (`timestep_spacing` "linspace", `beta_schedule` "linear"). Keys of other schedulers
    /// (DDIM's `clip_sample`, `set_alpha_to_one`, Euler's `interpolation_type`, ...) are ignored,
    /// as diffusers ignores them; options this crate does not implement are errors.
    pub fn from_config(c: &SchedulerConfig, path: &Path) -> Result<Self> {
        let unsupported = [
            ("use_karras_sigmas", c.use_karras_sigmas == Some(true)),
            ("use_exponential_sigmas", c.use_exponential_sigmas == Some(true)),
            ("use_beta_sigmas", c.use_beta_sigmas == Some(true)),
            ("use_lu_lambdas", c.use_lu_lambdas == Some(true)),
            ("use_flow_sigmas", c.use_flow_sigmas == Some(true)),
            // DDPM's "fixed_small" and the like change nothing here; learned variances would.
            ("variance_type", matches!(c.variance_type.as_deref(), Some("learned" | "learned_range"))),
        ];
        for (key, set) in unsupported {
            if set {
                return Err(Error::config(
                    path,
                    key,
                    "only diffusers' default is supported by the DPM-Solver++ sampler",
                ));
            }
        }
        // diffusers maps "deis" to "dpmsolver++" and UniPC's solver types to "midpoint".
        match c.algorithm_type.as_deref().unwrap_or("dpmsolver++") {
            "dpmsolver++" | "deis" => {}
            other => {
                return Err(Error::config(
                    path,
                    "algorithm_type",
                    format!("only \"dpmsolver++\" is supported, got {other:?}"),
                ))
            }
        }
        let solver_type = match c.solver_type.as_deref().unwrap_or("midpoint") {
            "midpoint" | "logrho" | "bh1" | "bh2" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => {
                return Err(Error::config(
                    path,
                    "solver_type",
                    format!("expected \"midpoint\" or \"heun\", got {other:?}"),
                ))
            }
        };
        let solver_order = c.solver_order.unwrap_or(2);
        if !(1..=2).contains(&solver_order) {
            return Err(Error::config(path, "solver_order", format!("only 1 and 2 are supported, got {solver_order}")));
        }
        let final_sigma = match c.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => FinalSigma::Zero,
            "sigma_min" => FinalSigma::SigmaMin,
            other => {
                return Err(Error::config(
                    path,
                    "final_sigmas_type",
                    format!("expected \"zero\" or \"sigma_min\", got {other:?}"),
                ))
            }
        };
        let lambda_min_clipped = c.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY);
        if lambda_min_clipped.is_nan() {
            return Err(Error::config(path, "lambda_min_clipped", "is NaN"));
        }
        Ok(Self {
            base: BaseSchedule::resolve(c, path, "linspace")?,
            solver_order,
            solver_type,
            lower_order_final: c.lower_order_final.unwrap_or(true),
            euler_at_final: c.euler_at_final.unwrap_or(false),
            final_sigma,
            lambda_min_clipped,
        })
    }
}

/// `lambda(t) = log(sqrt(a_t) / sqrt(1 - a_t))`, the half log-SNR of a training timestep.
pub fn lambda(alpha_cumprod: f64) -> f64 {
    0.5 * (alpha_cumprod / (1.0 - alpha_cumprod)).ln()
}

/// One past the last training timestep kept: `num_train_timesteps` minus the number of timesteps
/// whose lambda is below `lambda_min_clipped` (diffusers' `searchsorted` on the flipped lambdas).
pub fn last_timestep(alphas_cumprod: &[f64], lambda_min_clipped: f64) -> usize {
    alphas_cumprod.len() - alphas_cumprod.iter().filter(|&&a| lambda(a) < lambda_min_clipped).count()
}

/// DPM-Solver's integer inference timesteps, descending. They differ from DDIM's: "linspace"
/// spreads `n + 1` points over `[0, last - 1]` and drops the 0, "leading" uses the ratio
/// `last // (n + 1)`; "trailing" is `round(arange(last, 0, -N / n)) - 1`.
pub fn dpm_timesteps(
    spacing: TimestepSpacing,
    last_timestep: usize,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Vec<i64> {
    let n = num_inference_steps;
    match spacing {
        TimestepSpacing::Linspace => {
            // np.linspace(0, last - 1, n + 1): i * step, the endpoint exact.
            let stop = last_timestep as f64 - 1.0;
            let step = stop / n as f64;
            (1..=n).rev().map(|i| round_half_even(if i == n { stop } else { i as f64 * step }) as i64).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = last_timestep / (n + 1);
            (1..=n).rev().map(|i| (i * ratio + steps_offset) as i64).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train_timesteps as f64 / n as f64;
            let count = (last_timestep as f64 / ratio).ceil() as usize;
            (0..count).map(|i| round_half_even(last_timestep as f64 - i as f64 * ratio) as i64 - 1).collect()
        }
    }
}

/// `np.interp(t, arange(len(ys)), ys)` at an integer `t`: `ys[t]`, clamped at both ends.
fn at_timestep(ys: &[f64], t: i64) -> f64 {
    ys[t.clamp(0, ys.len() as i64 - 1) as usize]
}

/// `(alpha_t, sigma_t)` of the VP process at noise level `sigma`.
pub fn alpha_sigma_t(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// Coefficients `(c_x, c_d0)` of the first-order update `x' = c_x x + c_d0 D0` from `sigma_s` to
/// `sigma_t`.
pub fn first_order_coefficients(sigma_s: f64, sigma_t: f64) -> (f64, f64) {
    let (_, sigma_ts) = alpha_sigma_t(sigma_s);
    let (alpha_t, sigma_tt) = alpha_sigma_t(sigma_t);
    // exp(-h) = exp(lambda_s - lambda_t) = sigma_t / sigma_s, exact (0) at a final sigma of 0.
    let exp_neg_h = sigma_t / sigma_s;
    (sigma_tt / sigma_ts, alpha_t * (1.0 - exp_neg_h))
}

/// Coefficients `(c_x, c_d0, c_d1, r)` of the second-order update `x' = c_x x + c_d0 D0 + c_d1 D1`
/// from `sigma_s0` to `sigma_t`, the previous step having been at `sigma_s1`, with `D1 = (x0_s0 -
/// x0_s1) / r`.
pub fn second_order_coefficients(
    solver_type: SolverType,
    sigma_s1: f64,
    sigma_s0: f64,
    sigma_t: f64,
) -> (f64, f64, f64, f64) {
    let (c_x, c_d0) = first_order_coefficients(sigma_s0, sigma_t);
    let (alpha_t, _) = alpha_sigma_t(sigma_t);
    let h = (sigma_s0 / sigma_t).ln();
    let h_0 = (sigma_s1 / sigma_s0).ln();
    let c_d1 = match solver_type {
        SolverType::Midpoint => 0.5 * c_d0,
        SolverType::Heun => alpha_t * (((-h).exp() - 1.0) / h + 1.0),
    };
    (c_x, c_d0, c_d1, h_0 / h)
}

/// A DPM-Solver++ sampler set to a number of inference steps. It is stateful: [`Self::step`]
/// keeps the data prediction of the step it took for the next one.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    pub config: DpmSolverMultistepConfig,
    /// Integer timesteps, descending.
    pub timesteps: Vec<i64>,
    /// One sigma per timestep, then the final sigma.
    pub sigmas: Vec<f64>,
    /// The step index and data prediction of the last step taken.
    previous: Option<(usize, Tensor)>,
}

impl DpmSolverMultistep {
    /// `DPMSolverMultistepScheduler(**config).set_timesteps(num_inference_steps)`.
    pub fn new(config: DpmSolverMultistepConfig, num_inference_steps: usize) -> Result<Self> {
        let b = &config.base;
        let n_train = b.num_train_timesteps;
        if num_inference_steps == 0 || num_inference_steps > n_train {
            return Err(Error::Input(format!(
                "num_inference_steps must be in 1..={n_train}, got {num_inference_steps}"
            )));
        }
        let ac = alphas_cumprod(&betas(&b.beta_schedule, n_train));
        let last = last_timestep(&ac, config.lambda_min_clipped);
        let timesteps = dpm_timesteps(b.timestep_spacing, last, n_train, num_inference_steps, b.steps_offset);
        // diffusers finds the first step's index by value, so a repeated first timestep would make
        // it skip steps (and run past its sigmas).
        if timesteps.is_empty() || timesteps.windows(2).any(|w| w[1] >= w[0]) || timesteps.iter().any(|&t| t < 0) {
            return Err(Error::Input(format!(
                "{num_inference_steps} DPM-Solver steps over {last} training timesteps give the timesteps {timesteps:?}: \
                 they must be distinct and non-negative"
            )));
        }
        let train_sigmas: Vec<f64> = ac.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| at_timestep(&train_sigmas, t)).collect();
        sigmas.push(match config.final_sigma {
            FinalSigma::Zero => 0.0,
            FinalSigma::SigmaMin => train_sigmas[0],
        });
        Ok(Self { config, timesteps, sigmas, previous: None })
    }

    /// The data prediction x0 (diffusers' `convert_model_output` for "dpmsolver++").
    fn data_prediction(&self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma_t(self.sigmas[i]);
        Ok(match self.config.base.prediction_type {
            PredictionType::Epsilon => ((sample - (model_output * sigma_t)?)? / alpha_t)?,
            PredictionType::VPrediction => ((sample * alpha_t)? - (model_output * sigma_t)?)?,
            PredictionType::Sample => model_output.clone(),
        })
    }

    /// Whether step `i` (of `n`) is first order although a previous prediction is at hand.
    fn lower_order_at(&self, i: usize) -> bool {
        let n = self.timesteps.len();
        let c = &self.config;
        i + 1 == n && (c.euler_at_final || (c.lower_order_final && n < 15) || c.final_sigma == FinalSigma::Zero)
    }

    /// One step from sigma_i to sigma_{i+1}. Second order when the previous call was step `i - 1`
    /// (its data prediction is kept); first order on the first call, or after a restart at another
    /// index, as a freshly set diffusers scheduler.
    pub fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        if i >= self.timesteps.len() {
            return Err(Error::Input(format!("step index {i} past {} steps", self.timesteps.len())));
        }
        let x0 = self.data_prediction(model_output, i, sample)?;
        let previous = match self.previous.take() {
            Some((j, x0_prev)) if j + 1 == i && self.config.solver_order == 2 && !self.lower_order_at(i) => {
                Some(x0_prev)
            }
            _ => None,
        };
        let (sigma_s0, sigma_t) = (self.sigmas[i], self.sigmas[i + 1]);
        let next = match previous {
            None => {
                let (c_x, c_d0) = first_order_coefficients(sigma_s0, sigma_t);
                ((sample * c_x)? + (&x0 * c_d0)?)?
            }
            Some(x0_prev) => {
                let (c_x, c_d0, c_d1, r) =
                    second_order_coefficients(self.config.solver_type, self.sigmas[i - 1], sigma_s0, sigma_t);
                let d1 = ((&x0 - x0_prev)? * (1.0 / r))?;
                (((sample * c_x)? + (&x0 * c_d0)?)? + (d1 * c_d1)?)?
            }
        };
        self.previous = Some((i, x0));
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_match_diffusers_spacings() {
        // Values printed by diffusers 0.42.1's set_timesteps.
        assert_eq!(dpm_timesteps(TimestepSpacing::Linspace, 1000, 1000, 4, 0), [999, 749, 500, 250]);
        assert_eq!(dpm_timesteps(TimestepSpacing::Leading, 1000, 1000, 4, 1), [801, 601, 401, 201]);
        assert_eq!(dpm_timesteps(TimestepSpacing::Trailing, 1000, 1000, 3, 0), [999, 666, 332]);
    }

    #[test]
    fn final_step_to_zero_lands_on_x0() {
        let (c_x, c_d0) = first_order_coefficients(0.3, 0.0);
        assert_eq!((c_x, c_d0), (0.0, 1.0));
    }

    #[test]
    fn midpoint_is_the_papers_2m_update() {
        // DPM-Solver++(2M): x' = (s_t / s_s) x - a_t (e^-h - 1) ((1 + 1 / 2r) x0 - (1 / 2r) x0_prev).
        let (s1, s0, t) = (2.0_f64, 1.0, 0.5);
        let (c_x, c_d0, c_d1, r) = second_order_coefficients(SolverType::Midpoint, s1, s0, t);
        let (x, x0, x0_prev) = (0.7, 0.2, -0.4);
        let got = c_x * x + c_d0 * x0 + c_d1 * (x0 - x0_prev) / r;
        let lam = |s: f64| -s.ln();
        let (h, h0) = (lam(t) - lam(s0), lam(s0) - lam(s1));
        let r2 = h0 / h;
        let (a_t, st_t) = alpha_sigma_t(t);
        let (_, st_s) = alpha_sigma_t(s0);
        let d = (1.0 + 0.5 / r2) * x0 - 0.5 / r2 * x0_prev;
        let want = st_t / st_s * x - a_t * ((-h).exp() - 1.0) * d;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }
}

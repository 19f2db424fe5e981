"""cascade.diffusion: Gaussian diffusion maths and samplers, torch only.

Knows nothing about U-Nets, text or files. Stages build on these names:

Schedules (`noise_schedule`)
    NoiseSchedule.from_name(name, timesteps=1000), name in "linear" (Ho et al. 2020), "cosine"
    (Nichol & Dhariwal 2021), "angle" (AngleSchedule() discretised). Attributes are float64 (T,)
    tensors where index t holds step t+1: betas, alphas_cumprod, alphas_cumprod_prev, signal_rates,
    noise_rates, posterior_variance, posterior_log_variance_clipped, posterior_mean_coef1/2;
    schedule.timesteps is T (an int). schedule.respace(k, spacing="uniform", t_min=0) -> (respaced,
    kept_steps): a NoiseSchedule over k steps with the same alpha_bar at the kept steps, and kept_steps, the
    (k,) LongTensor of the original timesteps kept, from t_min to T - 1 (respaced index i is original step
    kept_steps[i]).
    AngleSchedule(s_min, s_max) is the continuous cosine-by-angle schedule; .discretize(N) gives a
    NoiseSchedule.
Forward process (`forward_process`)
    q_sample(schedule, x0, t, noise); q_mean_variance(schedule, x0, t);
    q_posterior_mean_variance(schedule, x0, x_t, t) -> (mean, variance, log_variance).
Parameterisations (`parameterization`)
    Prediction.EPS / X0 / V; eps_to_x0, x0_to_eps, x0_eps_to_v, v_to_x0, v_to_eps;
    model_output_to_eps / model_output_to_x0(schedule, prediction, out, x_t, t);
    prediction_target(schedule, prediction, x0, noise, t).
Losses (`losses`, `likelihood`, `learned_variance`)
    diffusion_loss(schedule, model_fn, x0, t, noise, prediction=Prediction.EPS, *,
    learned_variance=False, vlb_weight=1e-3, snr_gamma=None) -> scalar; loss_terms(...) -> per-sample
    dict; min_snr_weight (min-SNR-gamma weighting); sample_timesteps; vlb_term_bpd (bits/dim); normal_kl; discretized_gaussian_log_likelihood;
    interpolated_log_variance.
Guidance and thresholding (`guidance`, `thresholding`)
    combine_guidance(eps_c, eps_u, w); repeat_to_batch(n, *conditioning) (conditioning for a guided
    call's rows); static_threshold; dynamic_threshold(x0, p); apply_threshold.
Samplers, one per module: sample_ddpm (`ddpm`), sample_ddim (`ddim`), sample_dpmpp_2m (`dpm_solver`),
    sample_karras (`karras`: Euler, Euler ancestral, Heun of Karras et al. 2022).
    Each calls a `Denoiser(denoise, respaced, kept_steps, guidance=, threshold=)` (`denoiser`) at
    respaced index i and gets DenoiserOutput(eps, x0, variance_out), variance_out None without a
    learned variance.

The sampling contract
---------------------
    sample(denoise, shape, *, schedule, sampler, steps, eta=0.0, guidance=None, threshold=None,
           generator=None, x_T=None, callback=None, progress=False) -> x_0 of `shape`

* sampler: "ddpm" (ancestral, sigma^2 = beta~; variance="large" for beta), "ddim" (eta = 0
  deterministic, Song et al. eq. 12), "dpmpp" (DPM-Solver++(2M), Lu et al. Algorithm 2; "dpmpp_karras"
  on the Karras grid), "euler", "euler_a" (ancestral) or "heun" (Karras et al. 2022, Algorithm 1).
* steps <= schedule.timesteps; the schedule is respaced to `steps` steps inside: evenly in t for
  ddpm and ddim, evenly in log-SNR for dpmpp, on the Karras sigma grid for the others (override with
  spacing="uniform" | "logsnr" | "karras").
* denoise(x_t, t) receives x_t (B, ...) and a LongTensor t of shape (B,) holding ORIGINAL
  timesteps in [0, schedule.timesteps), also when respaced, and returns eps (B, ...). A network
  with learned variance returns a tuple (eps, variance_out), variance_out its raw variance output
  (see `learned_variance`: Sigma = exp(f log beta + (1 - f) log beta~), f = (variance_out + 1) / 2;
  not the velocity v of Prediction.V); the ddpm sampler uses it, the others ignore it. Networks
  predicting x0 or v wrap their output with model_output_to_eps(schedule, prediction, out, x_t, t)
  using the ORIGINAL schedule.
* guidance: None or 1.0 calls denoise(x, t). Any other float w calls, once per step,
  denoise(torch.cat([x, x]), torch.cat([t, t]), cond_mask=m) with m a (2B,) bool tensor, True for
  the first B rows (conditional) and False for the last B (unconditional: the network must drop
  its conditioning there), and uses eps_u + w (eps_c - eps_u). w = 0 is the unconditional model.
* threshold: None, "static" (clip x0_hat to [-1, 1]) or a float p in (0, 1): Imagen's dynamic
  thresholding at percentile p. eps is recomputed from the thresholded x0_hat.
* generator: seeds all noise (x_T when not given, ddpm, euler_a and eta > 0 noise); the same seed gives
  identical output. x_T: the starting noise, held fixed by callers (e.g. for interpolation).
* callback({"x", "i", "x0"}) after every step (i the respaced index, descending);
  progress=True shows a tqdm bar.
* Image to image: sample_from_image(denoise, x0, strength, *, schedule, sampler, steps, noise, ...)
  noises x0 to round(strength (T - 1)) and samples down from there (SDEdit); strength 1 is sample(x_T=noise).
* Inpainting: sample_inpaint(denoise, known, mask, *, schedule, sampler, steps, resample=1, jump=1, ...)
  samples where mask is 1 and keeps `known` where it is 0, replacing the known region by the original
  noised to each step; resample > 1 adds RePaint's resampling (ddpm and ddim; `inpainting` module).
* Optional extras: variance="small" | "large" (ddpm's fixed variance), spacing (see above), t_min (the
  steps end at original timestep t_min and the result is the x0 estimate there; 0: the first step),
  device (where x_T is drawn when not given; default the generator's device, else the CPU).
"""
from cascade.diffusion.ddim import sample_ddim
from cascade.diffusion.ddpm import sample_ddpm
from cascade.diffusion.denoiser import Denoiser, DenoiserOutput
from cascade.diffusion.dpm_solver import sample_dpmpp_2m
from cascade.diffusion.karras import sample_karras
from cascade.diffusion.forward_process import q_mean_variance, q_posterior_mean_variance, q_sample
from cascade.diffusion.guidance import combine_guidance, guided_denoise, repeat_to_batch
from cascade.diffusion.learned_variance import fixed_large_log_variance, interpolated_log_variance
from cascade.diffusion.likelihood import discretized_gaussian_log_likelihood, mean_flat, normal_kl, vlb_term_bpd
from cascade.diffusion.losses import diffusion_loss, loss_terms, min_snr_weight, sample_timesteps
from cascade.diffusion.noise_schedule import AngleSchedule, NoiseSchedule, broadcast_at
from cascade.diffusion.parameterization import (
    Prediction,
    eps_to_x0,
    model_output_to_eps,
    model_output_to_x0,
    prediction_target,
    v_to_eps,
    v_to_x0,
    x0_eps_to_v,
    x0_to_eps,
)
from cascade.diffusion.inpainting import inpaint_steps, repaint_walk, sample_inpaint
from cascade.diffusion.sampling import SAMPLERS, sample, sample_from_image
from cascade.diffusion.thresholding import apply_threshold, dynamic_threshold, static_threshold

__all__ = [
    "AngleSchedule", "Denoiser", "DenoiserOutput", "NoiseSchedule", "Prediction", "SAMPLERS",
    "apply_threshold", "broadcast_at", "combine_guidance", "diffusion_loss", "discretized_gaussian_log_likelihood",
    "dynamic_threshold", "eps_to_x0", "fixed_large_log_variance", "guided_denoise", "interpolated_log_variance",
    "loss_terms", "mean_flat", "min_snr_weight", "model_output_to_eps", "model_output_to_x0", "normal_kl", "prediction_target",
    "q_mean_variance", "q_posterior_mean_variance", "q_sample", "repeat_to_batch", "sample", "sample_ddim", "sample_ddpm",
    "inpaint_steps", "repaint_walk", "sample_dpmpp_2m", "sample_from_image", "sample_inpaint", "sample_karras", "sample_timesteps", "static_threshold", "v_to_eps",
    "v_to_x0", "vlb_term_bpd",
    "x0_eps_to_v", "x0_to_eps",
]

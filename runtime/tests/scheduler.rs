//! Schedulers vs diffusers 0.42.1, step by step. Fixtures: tests/fixtures/scheduler/expected.json,
//! written by gen_scheduler_fixtures.py there (never run by this test).

use motionrt_runtime::scheduler::{
    create, Scheduler, SchedulerConfig, SchedulerError, SchedulerKind, TimestepSpacing,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Per-step tolerance on scaled inputs, prev_sample and add_noise: max |rust - diffusers| must be
/// ≤ this × max|diffusers| over the tensor. Each step starts from diffusers' recorded sample, so
/// errors do not compound. The Rust code follows diffusers' float32 operation order; what is
/// left is that diffusers writes `x ** 0.5`, which torch 2.15 on CPU evaluates with a pow
/// routine that is up to 1 ulp off a correctly rounded `sqrt` (Rust uses `sqrt`), giving a few
/// f32 ulps in the outputs: measured ≤ 2.2e-7 relative. 1e-5 leaves margin for other CPUs /
/// torch builds while still catching any formula or schedule mistake (those are ≥ 1e-3).
const STEP_REL_TOL: f64 = 1e-5;
/// Sigmas: relative tolerance per value.
const SIGMA_REL_TOL: f64 = 1e-5;
/// Float (Euler) timesteps: absolute tolerance. Integer timesteps must match exactly.
const TIMESTEP_ABS_TOL: f64 = 1e-4;

fn fixture() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/scheduler/expected.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("expected.json")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

/// max |a - b| / max |b| (0 when both are all zero).
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let mut max_err = 0f64;
    let mut max_ref = 0f64;
    for (&g, &w) in got.iter().zip(want) {
        max_err = max_err.max((f64::from(g) - f64::from(w)).abs());
        max_ref = max_ref.max(f64::from(w).abs());
    }
    if max_ref == 0.0 {
        max_err
    } else {
        max_err / max_ref
    }
}

fn case_config(base: &Value, case: &Value) -> SchedulerConfig {
    let mut cfg = base.as_object().unwrap().clone();
    for (k, v) in case["config"].as_object().unwrap() {
        cfg.insert(k.clone(), v.clone());
    }
    SchedulerConfig::from_diffusers_json(&Value::Object(cfg)).expect("config")
}

fn build(base: &Value, case: &Value) -> Box<dyn Scheduler> {
    let kind: SchedulerKind = case["kind"].as_str().unwrap().parse().unwrap();
    let steps = case["steps"].as_u64().unwrap() as usize;
    create(kind, &case_config(base, case), steps).unwrap()
}

#[test]
fn schedules_match_diffusers() {
    let fx = fixture();
    let base = &fx["base_config"];
    let cases = fx["cases"].as_array().unwrap();
    let mut checked = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let s = build(base, case);
        let want_t: Vec<f64> = case["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let got_t = s.timesteps();
        assert_eq!(
            got_t.len(),
            want_t.len(),
            "{name}: timestep count {got_t:?} vs {want_t:?}"
        );
        for (i, (&g, &w)) in got_t.iter().zip(&want_t).enumerate() {
            let g = f64::from(g);
            if w.fract() == 0.0 && s.kind() != SchedulerKind::Euler {
                assert_eq!(g, w, "{name}: timestep {i}: {got_t:?} vs {want_t:?}");
            } else {
                assert!(
                    (g - w).abs() <= TIMESTEP_ABS_TOL,
                    "{name}: timestep {i}: {g} vs {w}"
                );
            }
        }
        if let Some(want_s) = case.get("sigmas") {
            let want_s = floats(want_s);
            let got_s = s.sigmas().unwrap_or_else(|| panic!("{name}: no sigmas"));
            assert_eq!(got_s.len(), want_s.len(), "{name}: sigma count");
            for (i, (&g, &w)) in got_s.iter().zip(&want_s).enumerate() {
                let err = (f64::from(g) - f64::from(w)).abs();
                assert!(
                    err <= SIGMA_REL_TOL * f64::from(w.abs()),
                    "{name}: sigma {i}: {g} vs {w}"
                );
            }
        }
        let want_init = case["init_noise_sigma"].as_f64().unwrap();
        let got_init = f64::from(s.init_noise_sigma());
        assert!(
            (got_init - want_init).abs() <= SIGMA_REL_TOL * want_init,
            "{name}: init_noise_sigma {got_init} vs {want_init}"
        );
        checked += 1;
    }
    println!("{checked} schedules match diffusers");
}

#[test]
fn trajectories_match_diffusers() {
    let fx = fixture();
    let base = &fx["base_config"];
    let mut worst: BTreeMap<String, f64> = BTreeMap::new();
    let mut runs = 0;
    for case in fx["cases"].as_array().unwrap() {
        let Some(run) = case.get("run") else { continue };
        let name = case["name"].as_str().unwrap();
        let mut s = build(base, case);
        let mut sample = floats(&case["sample"]);
        let mut scaled = vec![0f32; sample.len()];
        let mut case_worst = 0f64;
        for (i, st) in run.as_array().unwrap().iter().enumerate() {
            s.scale_model_input(&sample, i, &mut scaled);
            let want_scaled = st.get("scaled_input").map(floats);
            let e = rel_err(&scaled, want_scaled.as_deref().unwrap_or(&sample));
            assert!(
                e <= STEP_REL_TOL,
                "{name}: step {i}: scaled input err {e:e}"
            );
            case_worst = case_worst.max(e);

            let model_output = floats(&st["model_output"]);
            let want_noise = st.get("noise").map(floats);
            let mut calls = 0;
            let mut noise_fn = |buf: &mut [f32]| {
                calls += 1;
                let n = want_noise
                    .as_deref()
                    .unwrap_or_else(|| panic!("{name}: step {i}: unexpected noise draw"));
                buf.copy_from_slice(n);
            };
            s.step(&model_output, i, &mut sample, &mut noise_fn);
            assert_eq!(
                calls,
                usize::from(want_noise.is_some()),
                "{name}: step {i}: noise draws"
            );
            let want = floats(&st["prev_sample"]);
            let e = rel_err(&sample, &want);
            assert!(e <= STEP_REL_TOL, "{name}: step {i}: prev_sample err {e:e}");
            case_worst = case_worst.max(e);
            // Continue from diffusers' own trajectory so errors do not compound.
            sample = want;
        }
        let an = &case["add_noise"];
        let step = an["step"].as_u64().unwrap() as usize;
        let (orig, noise) = (floats(&an["original"]), floats(&an["noise"]));
        let mut out = vec![0f32; orig.len()];
        s.add_noise(&orig, &noise, step, &mut out);
        let e = rel_err(&out, &floats(&an["noisy"]));
        assert!(e <= STEP_REL_TOL, "{name}: add_noise err {e:e}");
        case_worst = case_worst.max(e);

        println!("{name:<70} max rel err {case_worst:.3e}");
        let kind = case["kind"].as_str().unwrap().to_string();
        let w = worst.entry(kind).or_insert(0.0);
        *w = w.max(case_worst);
        runs += 1;
    }
    println!("max error (max|rust - diffusers| / max|diffusers|) per scheduler:");
    for (kind, e) in &worst {
        println!("  {kind:<16} {e:.3e}");
    }
    assert_eq!(
        worst.len(),
        SchedulerKind::ALL.len(),
        "every kind has a run"
    );
    assert!(runs >= 10);
}

#[test]
fn kind_names_round_trip() {
    for kind in SchedulerKind::ALL {
        assert_eq!(kind.to_string().parse::<SchedulerKind>().unwrap(), kind);
    }
    assert_eq!(
        "EULER_A".parse::<SchedulerKind>().unwrap(),
        SchedulerKind::EulerAncestral
    );
    let err = "heun".parse::<SchedulerKind>().unwrap_err();
    assert_eq!(err, SchedulerError::UnknownKind("heun".into()));
    assert!(err.to_string().contains("dpmpp-2m-karras"), "{err}");
}

#[test]
fn invalid_step_counts_are_errors() {
    let cfg = SchedulerConfig::animatediff();
    for kind in SchedulerKind::ALL {
        let err = create(kind, &cfg, 0).err().unwrap();
        assert_eq!(err, SchedulerError::ZeroSteps, "{kind}");
        let err = create(kind, &cfg, 1001).err().unwrap();
        assert_eq!(
            err,
            SchedulerError::TooManySteps {
                steps: 1001,
                train: 1000
            },
            "{kind}"
        );
        assert!(err.to_string().contains("1001"), "{err}");
    }
    let err = create(SchedulerKind::Lcm, &cfg, 51).err().unwrap();
    assert_eq!(
        err,
        SchedulerError::LcmTooManySteps {
            steps: 51,
            original: 50
        }
    );
    assert!(
        err.to_string().contains("original_inference_steps"),
        "{err}"
    );
    assert!(create(SchedulerKind::Lcm, &cfg, 50).is_ok());
    // DDIM's default "leading" spacing (a config that names none) with steps_offset 1: 1000
    // steps would reach timestep 1000
    let leading = SchedulerConfig {
        timestep_spacing: None,
        ..cfg.clone()
    };
    let err = create(SchedulerKind::Ddim, &leading, 1000).err().unwrap();
    assert!(
        err.to_string().contains("leading") && err.to_string().contains("1000"),
        "{err}"
    );
    let trailing = SchedulerConfig {
        timestep_spacing: Some(TimestepSpacing::Trailing),
        ..cfg.clone()
    };
    assert!(create(SchedulerKind::Ddim, &trailing, 1000).is_ok());
    // Karras sigmas replace the spaced timesteps, so a spacing that would reach past the table
    // (trailing's float arange at 61 steps ends at -1; leading at 999) does not matter to them
    for (spacing, steps) in [
        (TimestepSpacing::Trailing, 61),
        (TimestepSpacing::Leading, 999),
    ] {
        let c = SchedulerConfig {
            timestep_spacing: Some(spacing),
            ..cfg.clone()
        };
        assert!(create(SchedulerKind::DpmPp2mKarras, &c, steps).is_ok());
    }
    // DPM-Solver's rounded linspace repeats a timestep at 1000 steps of 1000
    let err = create(SchedulerKind::DpmPp2m, &cfg, 1000).err().unwrap();
    assert!(err.to_string().contains("repeat"), "{err}");
    // an offset or clip range no schedule can use
    for (bad, says) in [
        (
            SchedulerConfig {
                steps_offset: 1000,
                ..cfg.clone()
            },
            "steps_offset",
        ),
        (
            SchedulerConfig {
                clip_sample_range: -1.0,
                ..cfg.clone()
            },
            "clip_sample_range",
        ),
        (
            SchedulerConfig {
                num_train_timesteps: 1 << 40,
                ..cfg.clone()
            },
            "num_train_timesteps",
        ),
    ] {
        let err = create(SchedulerKind::Ddim, &bad, 10).err().unwrap();
        assert!(err.to_string().contains(says), "{err}");
    }
}

/// Every scheduler runs every step of the longest schedule it accepts (at most 1000) without
/// indexing past its tables, and ends finite.
#[test]
fn the_longest_accepted_schedules_run_to_the_end() {
    for spacing in [
        None,
        Some(TimestepSpacing::Leading),
        Some(TimestepSpacing::Linspace),
        Some(TimestepSpacing::Trailing),
    ] {
        let cfg = SchedulerConfig {
            timestep_spacing: spacing,
            ..SchedulerConfig::animatediff()
        };
        for kind in SchedulerKind::ALL {
            let (steps, mut s) = (1..=1000)
                .rev()
                .find_map(|n| create(kind, &cfg, n).ok().map(|s| (n, s)))
                .unwrap();
            assert!(steps >= 50, "{kind} {spacing:?}: {steps}");
            let mut x = vec![0.5f32; 4];
            let mut noise = |v: &mut [f32]| v.fill(0.1);
            for i in 0..s.timesteps().len() {
                let m = vec![0.1f32; 4];
                s.step(&m, i, &mut x, &mut noise);
            }
            assert!(
                x.iter().all(|v| v.is_finite()),
                "{kind} {spacing:?} at {steps}: {x:?}"
            );
        }
    }
}

#[test]
fn config_json() {
    let cfg = SchedulerConfig::animatediff();
    let json = serde_json::to_value(&cfg).unwrap();
    let back: SchedulerConfig = serde_json::from_value(json).unwrap();
    assert_eq!(back, cfg);

    // A diffusers scheduler_config.json with class metadata and unknown keys.
    let v: Value = serde_json::json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.24.0",
        "beta_end": 0.012,
        "beta_schedule": "linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "linspace",
        "trained_betas": null,
        "some_future_key": [1, 2, 3]
    });
    assert_eq!(SchedulerConfig::from_diffusers_json(&v).unwrap(), cfg);

    let v = serde_json::json!({"timestep_spacing": "trailing", "prediction_type": "v_prediction"});
    let c = SchedulerConfig::from_diffusers_json(&v).unwrap();
    assert_eq!(c.timestep_spacing, Some(TimestepSpacing::Trailing));

    // Absent timestep_spacing: each class's default.
    let c = SchedulerConfig::from_diffusers_json(&serde_json::json!({})).unwrap();
    assert_eq!(c.spacing_for(SchedulerKind::Ddim), TimestepSpacing::Leading);
    assert_eq!(
        c.spacing_for(SchedulerKind::Euler),
        TimestepSpacing::Linspace
    );

    for bad in [
        serde_json::json!({"beta_schedule": "squaredcos_cap_v2"}),
        serde_json::json!({"thresholding": true}),
        serde_json::json!({"rescale_betas_zero_snr": true}),
        serde_json::json!({"algorithm_type": "sde-dpmsolver++"}),
        serde_json::json!({"timestep_spacing": "karras"}),
        serde_json::json!({"trained_betas": [0.1, 0.2]}),
        serde_json::json!([1, 2]),
    ] {
        let err = SchedulerConfig::from_diffusers_json(&bad).unwrap_err();
        assert!(matches!(err, SchedulerError::Config(_)), "{bad}: {err}");
    }
}

#[test]
fn deterministic_schedulers_never_draw_noise() {
    let cfg = SchedulerConfig::animatediff();
    for kind in [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
    ] {
        let mut s = create(kind, &cfg, 6).unwrap();
        let mut x = vec![0.5f32; 8];
        let mut inp = vec![0f32; 8];
        for i in 0..s.timesteps().len() {
            s.scale_model_input(&x, i, &mut inp);
            let eps: Vec<f32> = inp.iter().map(|v| 0.1 * v).collect();
            s.step(&eps, i, &mut x, &mut |_| panic!("{kind} drew noise"));
        }
        assert!(x.iter().all(|v| v.is_finite()), "{kind}");
    }
}

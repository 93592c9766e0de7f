//! Static machine-code figures of the CUDA kernels, no GPU needed: compiles a kernel source with
//! NVRTC for an architecture (the cubin the engine loads), disassembles it with `cuobjdump`, and
//! prints per entry point its registers, its instruction count, the sizes of its loops (the spans
//! of its backward branches, largest first) and the most frequent opcodes of the largest (in the
//! attention kernels, one key tile; `--loop K`: the K-th largest). A way to see what a source change does to the inner loop before
//! a GPU times it; not a timing.
//!
//! `cargo run --release -p motionrt-kernels --example kernel_sass -- [FILTER] [--source engine_ops]
//!  [--arch sm_90] [--loop 1] [--cubin OUT.cubin]`
//!
//! FILTER keeps the entry points whose name contains it. `cuobjdump` is `$CUOBJDUMP`, else the one
//! on PATH (a CUDA toolkit; the `triton` wheel ships one under `triton/backends/nvidia/bin`).

use std::collections::BTreeMap;
use std::process::Command;

use motionrt_kernels::cuda;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let (mut filter, mut source, mut arch, mut keep) = (String::new(), "engine_ops", "sm_90", None);
    let mut which = 1usize;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--source" => {
                let v = val()?;
                source = cuda::SOURCES
                    .iter()
                    .find(|(n, _)| *n == v)
                    .ok_or(format!("unknown --source {v}"))?
                    .0;
            }
            "--arch" => {
                arch = match val()?.as_str() {
                    "sm_80" => "sm_80",
                    "sm_90" => "sm_90",
                    other => return Err(format!("--arch {other}: sm_80 or sm_90").into()),
                }
            }
            "--cubin" => keep = Some(val()?),
            "--loop" => which = val()?.parse::<usize>()?.max(1),
            "-h" | "--help" => {
                println!(
                    "usage: kernel_sass [FILTER] [--source NAME] [--arch sm_80|sm_90] [--loop K] [--cubin OUT]"
                );
                return Ok(());
            }
            _ => filter = a,
        }
    }
    let c = cuda::compile_uncached(source, arch)?;
    let path = match &keep {
        Some(p) => p.clone(),
        None => std::env::temp_dir()
            .join(format!("motionrt-sass-{}.cubin", std::process::id()))
            .to_string_lossy()
            .into_owned(),
    };
    std::fs::write(&path, &c.cubin)?;
    let tool = std::env::var("CUOBJDUMP").unwrap_or_else(|_| "cuobjdump".into());
    let run = |args: &[&str]| -> Res<String> {
        let out = Command::new(&tool)
            .args(args)
            .arg(&path)
            .output()
            .map_err(|e| format!("{tool}: {e} (set CUOBJDUMP to a cuobjdump binary)"))?;
        if !out.status.success() {
            return Err(
                format!("{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into(),
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let regs = registers(&run(&["-res-usage"])?);
    let sass = run(&["-sass"])?;
    if keep.is_none() {
        let _ = std::fs::remove_file(&path);
    }
    println!("{source} for {arch} (NVRTC {:?})", cuda::nvrtc_version()?);
    println!("| entry | registers | instructions | loops | loop {which}'s most frequent opcodes |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, ins) in functions(&sass) {
        if !name.contains(&filter) {
            continue;
        }
        let spans = loops(&ins);
        let body: Vec<&(u64, String)> = spans.get(which - 1).map_or(Vec::new(), |&(a, b)| {
            ins.iter().filter(|(x, _)| (a..=b).contains(x)).collect()
        });
        let sizes: Vec<String> = spans
            .iter()
            .take(6)
            .map(|&(a, b)| {
                ins.iter()
                    .filter(|(x, _)| (a..=b).contains(x))
                    .count()
                    .to_string()
            })
            .collect();
        let mut ops: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, text) in &body {
            *ops.entry(opcode(text)).or_default() += 1;
        }
        let mut ops: Vec<_> = ops.into_iter().collect();
        ops.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let top: Vec<String> = ops
            .iter()
            .take(10)
            .map(|(o, n)| format!("{o} {n}"))
            .collect();
        let r = regs.get(&name).map_or("?".into(), |r| r.to_string());
        println!(
            "| {name} | {r} | {} | {} | {} |",
            ins.len(),
            sizes.join(", "),
            top.join(", ")
        );
    }
    Ok(())
}

/// `Function NAME:` then `REG:N ...` lines of `cuobjdump -res-usage`.
fn registers(text: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let mut name = None;
    for line in text.lines() {
        if let Some(n) = line.trim().strip_prefix("Function ") {
            name = Some(n.trim_end_matches(':').to_string());
        } else if let (Some(n), Some(r)) = (&name, line.split("REG:").nth(1)) {
            if let Ok(r) = r.split_whitespace().next().unwrap_or("").parse() {
                out.insert(n.clone(), r);
            }
        }
    }
    out
}

/// Each function's instructions: (address, text without the encoding comment).
fn functions(sass: &str) -> Vec<(String, Vec<(u64, String)>)> {
    let mut out: Vec<(String, Vec<(u64, String)>)> = Vec::new();
    for line in sass.lines() {
        let t = line.trim();
        if let Some(n) = t.strip_prefix("Function : ") {
            out.push((n.trim().to_string(), Vec::new()));
            continue;
        }
        // `/*0a30*/   HMMA.16816.F32 R76, R44, R68, RZ ;   /* 0x... */`
        let Some(rest) = t.strip_prefix("/*") else {
            continue;
        };
        let Some((addr, rest)) = rest.split_once("*/") else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        let Some((text, _)) = rest.split_once(';') else {
            continue;
        };
        if let Some((_, v)) = out.last_mut() {
            v.push((addr, text.trim().to_string()));
        }
    }
    out
}

/// The loops: (target, source) of every backward branch, the longest first (one per target).
fn loops(ins: &[(u64, String)]) -> Vec<(u64, u64)> {
    let mut spans: BTreeMap<u64, u64> = BTreeMap::new();
    for (addr, text) in ins {
        if opcode(text) != "BRA" {
            continue;
        }
        let Some(target) = text.split_whitespace().find_map(|w| {
            w.strip_prefix("0x")
                .and_then(|h| u64::from_str_radix(h, 16).ok())
        }) else {
            continue;
        };
        if target < *addr {
            let e = spans.entry(target).or_insert(*addr);
            *e = (*e).max(*addr);
        }
    }
    let mut v: Vec<(u64, u64)> = spans.into_iter().collect();
    v.sort_by_key(|&(a, b)| std::cmp::Reverse(b - a));
    v
}

/// The opcode without its predicate guard and modifiers: `@!P0 HMMA.16816.F32 ...` -> `HMMA`.
fn opcode(text: &str) -> &str {
    let mut w = text.split_whitespace();
    let first = w.next().unwrap_or("");
    let op = if first.starts_with('@') {
        w.next().unwrap_or("")
    } else {
        first
    };
    op.split('.').next().unwrap_or("")
}

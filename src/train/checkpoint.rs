//! Checkpoints: the adapter in PEFT format plus the optimizer state, so `--resume` continues
//! exactly. Each checkpoint is a folder `checkpoint-<step>` written under a temporary name and
//! renamed into place, so a killed run leaves only complete checkpoints behind; the newest
//! complete one is the one resumed.

use super::program::ParamRole;
use super::session::Session;
use crate::error::{Error, Result, Subject};
use crate::ir::{Graph, Patch};
use crate::tensor::Array;
use crate::tensors_io::{read_safetensors, write_atomic, write_safetensors};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "optimizer.safetensors";
pub const TRAINER_FILE: &str = "trainer_state.json";
pub const FULL_WEIGHTS_FILE: &str = "trained_weights.safetensors";

/// Writes the current parameters into `graph`'s constants (so adapter export sees them).
pub fn sync_params(graph: &mut Graph, session: &Session) -> Result<()> {
    let mut p = Patch::new(graph);
    for (name, t) in session.params()? {
        let id = graph
            .find_by_name(&name)
            .ok_or_else(|| Error::graph(format!("parameter '{name}' is not in the model graph")))?;
        p.set_const(id, t)?;
    }
    graph.apply(p.finish());
    Ok(())
}

/// Writes the trained tensors to `dir`: a PEFT adapter (adapter methods) or the trained weights
/// (full fine-tuning). `graph` is the model graph with adapters, parameters synced.
pub fn write_weights(graph: &Graph, session: &Session, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    if session
        .program
        .params
        .iter()
        .all(|p| p.role == ParamRole::Weight)
    {
        let tensors: BTreeMap<String, Array> = session
            .params()?
            .into_iter()
            .map(|(k, t)| (k, t.to_array()))
            .collect();
        return write_safetensors(&dir.join(FULL_WEIGHTS_FILE), &tensors);
    }
    crate::adapter::save(graph, dir)
}

/// Replaces the weights a full fine-tuning run saved (`trained_weights.safetensors`, tensors
/// named after the model's initializers) in `graph`, checking each name and shape; returns the
/// names replaced.
pub fn load_trained_weights(graph: &mut Graph, path: &Path) -> Result<Vec<String>> {
    let mut names = vec![];
    let mut p = Patch::new(graph);
    for (name, a) in read_safetensors(path)? {
        let id = graph.find_by_name(&name).ok_or_else(|| {
            Error::input_at(
                Subject::file(path),
                format!("'{name}' is not a weight of this model"),
            )
        })?;
        let old = graph.const_tensor(id).ok_or_else(|| {
            Error::input_at(
                Subject::file(path),
                format!("'{name}' is not a constant of this model"),
            )
        })?;
        if old.shape != a.shape {
            let at = Subject::context(format!("{}: '{name}'", path.display()));
            return Err(Error::shape_mismatch(at, &a.shape, &old.shape));
        }
        p.set_const(id, a.to_tensor_f32())?;
        names.push(name);
    }
    graph.apply(p.finish());
    Ok(names)
}

/// Saves `checkpoint-<step>` under `out` and prunes all but the newest `keep` (0 keeps all).
pub fn save(
    out: &Path,
    graph: &Graph,
    session: &Session,
    trainer: &Value,
    keep: usize,
) -> Result<PathBuf> {
    let step = session.steps_taken()?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let final_dir = out.join(format!("checkpoint-{step}"));
    let tmp = out.join(format!(".checkpoint-{step}.tmp-{}", std::process::id()));
    crate::tensors_io::clean_stale_temps(out);
    let _ = std::fs::remove_dir_all(&tmp);
    let state = session.read_state()?;
    if let Some((name, _)) = state
        .iter()
        .find(|(_, a)| a.data.iter().any(|v| !v.is_finite()))
    {
        let last = latest(out)?
            .map(|(s, d)| format!("the last checkpoint ({}, step {s}) is intact", d.display()))
            .unwrap_or_else(|| "no checkpoint was written".into());
        return Err(Error::input(format!(
            "'{name}' became non-finite at step {step}; stopping: {last}. Try a lower --lr or --grad-clip"
        )));
    }
    let result = (|| -> Result<()> {
        write_weights(graph, session, &tmp)?;
        write_safetensors(&tmp.join(STATE_FILE), &state)?;
        let text = serde_json::to_string_pretty(trainer).expect("JSON serialises");
        write_atomic(&tmp.join(TRAINER_FILE), text.as_bytes())?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let mut all = list(out)?;
    all.sort();
    while keep > 0 && all.len() > keep {
        let (_, old) = all.remove(0);
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(final_dir)
}

/// Complete checkpoints under `out`, as (step, path).
pub fn list(out: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(vec![]);
    };
    let mut found = vec![];
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if e.path().join(TRAINER_FILE).exists() {
                found.push((step, e.path()));
            }
        }
    }
    Ok(found)
}

/// The newest complete checkpoint under `out`.
pub fn latest(out: &Path) -> Result<Option<(usize, PathBuf)>> {
    Ok(list(out)?.into_iter().max())
}

/// A checkpoint's trainer record (step, settings).
pub fn read_record(dir: &Path) -> Result<Value> {
    let path = dir.join(TRAINER_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::input_at(Subject::file(&path), format!("invalid JSON ({e})")))
}

/// Loads a checkpoint's optimizer state (parameters, moments, step) into the session.
pub fn restore(dir: &Path, session: &mut Session) -> Result<()> {
    let state = read_safetensors(&dir.join(STATE_FILE))?;
    session.write_state(&state)
}

/// The trainer record stored with each checkpoint.
pub fn trainer_record(step: usize, total_steps: usize, seed: u64, config: &Value) -> Value {
    json!({ "step": step, "total_steps": total_steps, "seed": seed, "config": config })
}

/// The lock a training run holds on its output folder: `.dorac-train.lock`, holding the
/// process id, created exclusively. A second run on the same folder is refused while the first
/// lives; a lock whose process is gone (a killed run) is taken over. Removed when dropped.
pub struct RunLock {
    path: PathBuf,
}

pub const LOCK_FILE: &str = ".dorac-train.lock";

impl RunLock {
    pub fn acquire(out: &Path) -> Result<RunLock> {
        use std::io::Write;
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let path = out.join(LOCK_FILE);
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(std::process::id().to_string().as_bytes())
                        .map_err(|e| Error::io(&path, e))?;
                    return Ok(RunLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|t| t.trim().parse::<u32>().ok());
                    match owner {
                        Some(pid) if crate::tensors_io::process_alive(pid) => {
                            return Err(Error::input_at(Subject::file(out), format!("another dorac run (process {pid}) is writing to this folder; wait for it, or choose another -o")))
                        }
                        // Its run was killed: the lock is stale.
                        _ => {
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::input_at(
            Subject::file(out),
            format!("cannot take the lock {LOCK_FILE}"),
        ))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Before a fresh (not resumed) run writes to `out`: checkpoints of an earlier run there would
/// mix with the new ones (and a later `--resume` would pick the wrong one), so they are refused
/// unless `overwrite`, which removes that run's files.
pub fn prepare_fresh(out: &Path, overwrite: bool) -> Result<()> {
    let old = list(out)?;
    if old.is_empty() {
        return Ok(());
    }
    if !overwrite {
        let newest = old.iter().map(|c| c.0).max().unwrap_or(0);
        return Err(Error::input(format!(
            "{} holds {} checkpoint(s) of an earlier run (the newest at step {newest}); use --resume to continue it, --overwrite to replace it, or another -o",
            out.display(),
            old.len()
        )));
    }
    for (_, dir) in old {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    for name in [
        crate::train::report::METRICS_FILE,
        "loss.png",
        FULL_WEIGHTS_FILE,
        crate::adapter::CONFIG_FILE,
        crate::adapter::WEIGHTS_FILE,
    ] {
        let p = out.join(name);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

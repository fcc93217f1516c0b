//! `dorac analyze`: the DoRA paper's magnitude / direction analysis of training runs (see
//! [`crate::analysis`]): a CSV and JSON of ΔM and ΔD per layer per checkpoint, and the scatter.

use super::common::load_rebatched;
use crate::analysis::{analyze_run, fit, mean_sd, summarize_run, Fit, LayerChange, RunSummary};
use crate::error::{Error, Result};
use crate::plot::{scatter, Scatter, ScatterPoint};
use crate::tensors_io::write_atomic;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(after_help = ANALYZE_HELP)]
pub struct Args {
    /// The base model the runs started from.
    pub model: PathBuf,
    /// Training output folders (their checkpoint-<step> folders are read; train with
    /// `--save-every N --keep-checkpoints 0` to keep every one), or single checkpoint folders.
    #[arg(required = true, value_name = "RUN")]
    pub runs: Vec<PathBuf>,
    /// Output folder for analysis.csv, analysis.json and analysis.png.
    #[arg(short, long, value_name = "DIR", default_value = "analysis")]
    pub output: PathBuf,
    /// Pin a symbolic dim of the model (`seq=64`), if its import needs one [default: none;
    /// the batch is 1].
    #[arg(long = "shape", value_name = "NAME=DIMS")]
    pub shapes: Vec<String>,
}

const ANALYZE_HELP: &str = concat!(
    "For each adapted layer of each checkpoint, with W0 the base weight and Wt the effective one\n",
    "(W0 + s(BA)^T, scaled per column by g = m / ||W0 + s(BA)^T|| for DoRA; the trained weight for\n",
    "full fine-tuning), both as [in, out] matrices with k output columns:\n",
    "  delta_m = mean_j | ||Wt[:, j]|| - ||W0[:, j]|| |\n",
    "  delta_d = mean_j (1 - cos(Wt[:, j], W0[:, j]))\n",
    "The scatter puts delta_d on x and delta_m on y, one colour per method, one marker per layer,\n",
    "with a least-squares line per method (its slope and correlation are printed).\n",
    "\n",
    "Examples:\n",
    "  dorac train models/shift/base.onnx --data models/shift/train_b.safetensors --loss cross-entropy --method lora --rank 4 --lr 5e-3 --batch-size 32 --steps 160 --save-every 40 --keep-checkpoints 0 -o runs/lora\n",
    "  dorac train models/shift/base.onnx --data models/shift/train_b.safetensors --loss cross-entropy --method dora --rank 4 --lr 5e-3 --batch-size 32 --steps 160 --save-every 40 --keep-checkpoints 0 -o runs/dora\n",
    "  dorac analyze models/shift/base.onnx runs/lora runs/dora -o analysis"
);

/// The methods in the order they are drawn and listed.
const METHOD_ORDER: [&str; 3] = ["full", "lora", "dora"];

pub fn run(args: Args) -> Result<()> {
    // Only the weights matter: any batch size will do.
    let base = load_rebatched(&args.model, &args.shapes, 1)?;
    let mut changes: Vec<LayerChange> = vec![];
    let mut summaries: Vec<RunSummary> = vec![];
    for run in &args.runs {
        let found = analyze_run(&base, run)?;
        if let Some(first) = found.first() {
            summaries.push(summarize_run(run, &first.method)?);
        }
        changes.extend(found);
    }
    if changes.is_empty() {
        return Err(Error::input("no adapted layers in the given runs"));
    }
    let mut methods: Vec<String> = changes.iter().map(|c| c.method.clone()).collect();
    methods.sort_by_key(|m| METHOD_ORDER.iter().position(|o| o == m).unwrap_or(9));
    methods.dedup();
    let mut layers: Vec<String> = vec![];
    for c in &changes {
        if !layers.contains(&c.layer) {
            layers.push(c.layer.clone());
        }
    }
    let fits: Vec<Option<Fit>> = methods
        .iter()
        .map(|m| {
            let pts: Vec<(f64, f64)> = changes
                .iter()
                .filter(|c| &c.method == m)
                .map(|c| (c.delta_d, c.delta_m))
                .collect();
            fit(&pts)
        })
        .collect();

    std::fs::create_dir_all(&args.output).map_err(|e| Error::io(&args.output, e))?;
    let mut csv = String::from("run,method,step,layer,delta_m,delta_d\n");
    for c in &changes {
        csv += &format!(
            "{},{},{},{},{:e},{:e}\n",
            c.run, c.method, c.step, c.layer, c.delta_m, c.delta_d
        );
    }
    write_atomic(&args.output.join("analysis.csv"), csv.as_bytes())?;
    let fit_json: serde_json::Map<String, serde_json::Value> = methods
        .iter()
        .zip(&fits)
        .map(|(m, f)| (m.clone(), serde_json::to_value(f).expect("fits serialise")))
        .collect();
    let json = serde_json::json!({
        "model": args.model.display().to_string(),
        "definitions": {
            "delta_m": "mean over output columns j of | ||Wt[:, j]|| - ||W0[:, j]|| |",
            "delta_d": "mean over output columns j of 1 - cos(Wt[:, j], W0[:, j])",
            "fit": "least squares delta_m = intercept + slope * delta_d over every point of the method; correlation is Pearson's r",
        },
        "runs": summaries,
        "changes": changes,
        "fits": fit_json,
    });
    let text = serde_json::to_string_pretty(&json).expect("JSON serialises");
    write_atomic(&args.output.join("analysis.json"), text.as_bytes())?;

    let points: Vec<ScatterPoint> = changes
        .iter()
        .map(|c| ScatterPoint {
            x: c.delta_d,
            y: c.delta_m,
            series: methods.iter().position(|m| *m == c.method).unwrap(),
            group: layers.iter().position(|l| *l == c.layer).unwrap(),
        })
        .collect();
    let legend: Vec<String> = methods
        .iter()
        .zip(&fits)
        .map(|(m, f)| match f {
            Some(f) => format!("{m}: slope {:.3}, r = {:.2}", f.slope, f.correlation),
            None => m.clone(),
        })
        .collect();
    let lines: Vec<Option<(f64, f64)>> = fits
        .iter()
        .map(|f| f.as_ref().map(|f| (f.slope, f.intercept)))
        .collect();
    scatter(
        &args.output.join("analysis.png"),
        (800, 560),
        &Scatter {
            title: "magnitude vs direction change (DoRA paper, Fig. 2)",
            x_label: "ΔD (mean 1 - cos)",
            y_label: "ΔM (mean |Δ column norm|)",
            series: &legend,
            groups: &layers,
            points: &points,
            fits: &lines,
        },
    )?;

    print_runs(&methods, &summaries);
    println!();
    println!(
        "{} points ({} runs, {} layers)",
        changes.len(),
        args.runs.len(),
        layers.len()
    );
    println!("method  points  slope dM/dD   correlation");
    for (m, f) in methods.iter().zip(&fits) {
        match f {
            Some(f) => println!(
                "{m:<6}  {:>6}  {:>12.4}  {:>11.3}",
                f.points, f.slope, f.correlation
            ),
            None => println!("{m:<6}  (too few points to fit)"),
        }
    }
    println!("per layer (slope, correlation):");
    for m in &methods {
        let mut line = format!("  {m:<6}");
        for l in &layers {
            let pts: Vec<(f64, f64)> = changes
                .iter()
                .filter(|c| &c.method == m && &c.layer == l)
                .map(|c| (c.delta_d, c.delta_m))
                .collect();
            match fit(&pts) {
                Some(f) => line += &format!("  {l} {:.3} ({:.2})", f.slope, f.correlation),
                None => line += &format!("  {l} -"),
            }
        }
        println!("{line}");
    }
    println!(
        "wrote {}/analysis.csv, analysis.json, analysis.png",
        args.output.display()
    );
    Ok(())
}

/// The comparison table: per method, its runs' mean and spread of the final evaluation.
fn print_runs(methods: &[String], runs: &[RunSummary]) {
    let pm = |v: Option<(f64, f64)>, scale: f64, digits: usize| match v {
        Some((m, sd)) => format!("{:.*} ± {:.*}", digits, m * scale, digits, sd * scale),
        None => "-".into(),
    };
    println!(
        "{:<7}{:>5}{:>11}  {:<19}{:<19}{:>9}",
        "method", "runs", "trainable", "eval accuracy (%)", "eval loss", "step ms"
    );
    for m in methods {
        let of: Vec<&RunSummary> = runs.iter().filter(|r| &r.method == m).collect();
        let values = |f: &dyn Fn(&RunSummary) -> Option<f64>| -> Vec<f64> {
            of.iter().filter_map(|r| f(r)).collect()
        };
        let trainable = of.first().map_or(0, |r| r.trainable);
        let step = mean_sd(&values(&|r| r.step_ms)).map_or("-".into(), |(m, _)| format!("{m:.1}"));
        println!(
            "{:<7}{:>5}{:>11}  {:<19}{:<19}{:>9}",
            m,
            of.len(),
            trainable,
            pm(mean_sd(&values(&|r| r.eval_accuracy)), 100.0, 2),
            pm(mean_sd(&values(&|r| r.eval_loss)), 1.0, 4),
            step
        );
    }
}

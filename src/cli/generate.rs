//! `dorac generate`: greedy decoding with a byte-level language model (token = byte value),
//! through the same compiled inference as `dorac run`. Shapes are static, so the model sees a
//! fixed window of positions: the prompt fills it from the left, each step appends the most
//! likely next byte, and once the window is full it slides.

use super::common::apply_adapter;
use crate::error::{Error, Result};
use crate::runtime::Executable;
use crate::tensor::{shape_str, Array};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  dorac generate models/gpt2_tiny/legacy_op17_dynamic.onnx --prompt 'The ' --tokens 16 --shape seq=16
  dorac generate models/gpt2_tiny/legacy_op17_dynamic.onnx --adapter models/gpt2_tiny/peft_dora --prompt 'The ' --tokens 16 --shape seq=16")]
pub struct Args {
    /// A byte-level causal language model (input ids [batch, positions] -> logits
    /// [batch, positions, 256]).
    pub model: PathBuf,
    /// A PEFT-format adapter to apply [default: none].
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    /// How many bytes to generate.
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    #[command(flatten)]
    pub engine: super::common::EngineArgs,
    /// Pin symbolic dims, e.g. `--shape seq=16` for a model exported with dynamic axes (the
    /// batch is 1) [default: none].
    #[arg(long = "shape", value_name = "NAME=DIMS", help_heading = "Shapes")]
    pub shapes: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let mut proto = crate::onnx::load_model(&args.model)?;
    crate::onnx::set_batch_dim(&mut proto, 1);
    let dir = args.model.parent().unwrap_or(std::path::Path::new("."));
    let pins = crate::onnx::ShapePins::parse(&args.shapes)?;
    let mut graph = crate::onnx::import(&proto, dir, &pins, &HashMap::new())?;
    if let Some(a) = &args.adapter {
        apply_adapter(&mut graph, a)?;
    }
    let graph = crate::pipeline::Inference::default().run(graph)?.value;
    let ids_node = *graph
        .inputs()
        .first()
        .ok_or_else(|| Error::input("the model has no inputs"))?;
    let ids_name = graph.node(ids_node).name.clone();
    let window = match graph.shape(ids_node) {
        [1, s] => *s,
        other => {
            return Err(Error::input(format!(
                "input '{ids_name}' has shape {}; generate needs token ids [batch, positions]",
                shape_str(other)
            )))
        }
    };
    let mask_name = graph
        .inputs()
        .iter()
        .map(|&i| graph.node(i).name.clone())
        .find(|n| n == "attention_mask");
    let (out_name, out_node) = graph.outputs()[0].clone();
    let vocab = *graph.shape(out_node).last().unwrap_or(&0);
    if graph.shape(out_node) != [1, window, vocab] || vocab < 256 {
        return Err(Error::input(format!(
            "output '{out_name}' has shape {}; generate needs byte logits [1, {window}, >=256]",
            shape_str(graph.shape(out_node))
        )));
    }
    let gpu = args.engine.open_gpu("generating")?;
    let exe = match &gpu {
        Some(g) => Some(Executable::compile(g, &graph)?),
        None => None,
    };
    let mut tokens: Vec<u8> = args.prompt.bytes().collect();
    if tokens.is_empty() {
        return Err(Error::input("--prompt is empty"));
    }
    let prompt_len = tokens.len();
    for _ in 0..args.tokens {
        let start = tokens.len().saturating_sub(window);
        let visible = &tokens[start..];
        let mut ids = vec![0f32; window];
        for (i, &t) in visible.iter().enumerate() {
            ids[i] = t as f32;
        }
        let mut mask = vec![0f32; window];
        mask[..visible.len()].iter_mut().for_each(|m| *m = 1.0);
        let logits: Vec<f32> = match &exe {
            Some(exe) => {
                let mut inputs = HashMap::from([(ids_name.clone(), ids)]);
                if let Some(m) = &mask_name {
                    inputs.insert(m.clone(), mask);
                }
                exe.run(&inputs)?.remove(&out_name).unwrap_or_default()
            }
            None => {
                let mut inputs =
                    HashMap::from([(ids_name.clone(), Array::from_f32(vec![1, window], &ids))]);
                if let Some(m) = &mask_name {
                    inputs.insert(m.clone(), Array::from_f32(vec![1, window], &mask));
                }
                let out = crate::reference::run(&graph, &inputs)?;
                out[&out_name].data.iter().map(|&v| v as f32).collect()
            }
        };
        let pos = visible.len() - 1;
        let row = &logits[pos * vocab..pos * vocab + 256];
        let next = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u8)
            .unwrap_or(b' ');
        tokens.push(next);
    }
    let text = String::from_utf8_lossy(&tokens);
    // The prompt's bytes are valid UTF-8, so its end is a char boundary of the lossy text.
    let (prompt, continuation) = text.split_at(prompt_len);
    println!("{prompt}[{continuation}]");
    Ok(())
}

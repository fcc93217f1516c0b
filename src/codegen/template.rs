//! The WGSL templates under `shaders/` and the `{{PLACEHOLDER}}` substitution that fills them.
//! Templates are compiled into the binary (`include_str!`), so `dorac` needs no files at run time.

use crate::error::{Error, Result};

/// A kernel template: its file name under `shaders/` (for messages) and its text.
#[derive(Clone, Copy)]
pub struct Template {
    pub name: &'static str,
    pub text: &'static str,
}

macro_rules! template {
    ($file:literal) => {
        Template {
            name: $file,
            text: include_str!(concat!("../../shaders/", $file)),
        }
    };
}

/// Kernel templates: one per family of ops.
pub const ELEMENTWISE: Template = template!("elementwise.wgsl");
pub const MATMUL: Template = template!("matmul.wgsl");
pub const REDUCE_SUM: Template = template!("reduce_sum.wgsl");
pub const REDUCE_MAX: Template = template!("reduce_max.wgsl");
pub const REDUCE_PROD: Template = template!("reduce_prod.wgsl");
pub const LAYER_NORM: Template = template!("layer_norm.wgsl");
pub const SOFTMAX: Template = template!("softmax.wgsl");
pub const SOFTMAX_ROWS: Template = template!("softmax_rows.wgsl");
pub const DORA_NORM: Template = template!("dora_norm.wgsl");
pub const DORA_NORM_SUBGROUP: Template = template!("dora_norm_subgroup.wgsl");
pub const DORA_NORM_COLUMNS: Template = template!("dora_norm_columns.wgsl");
pub const CROSS_ENTROPY: Template = template!("cross_entropy.wgsl");
pub const CROSS_ENTROPY_GRAD: Template = template!("cross_entropy_grad.wgsl");

/// Helper libraries, pasted into a kernel only when it uses them, in this order (a library may
/// use the ones declared before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lib {
    Erf,
    Tanh,
    Pow,
    /// Uses [`Lib::Pow`].
    PowInt,
    WorkgroupReduce,
    SigmoidGrad,
    TanhGrad,
    /// Uses [`Lib::Erf`].
    GeluGrad,
    GeluTanhGrad,
    /// Uses [`Lib::WorkgroupReduce`].
    RowSoftmaxStats,
    IsNan,
    GatherPosition,
    /// Decoding of f16 / bf16 pairs (weights stored in half precision).
    Half,
    /// Decoding of block-quantized codes (weights stored as a quantized model stores them).
    Blocks,
}

impl Lib {
    pub fn source(self) -> &'static str {
        match self {
            Lib::Erf => include_str!("../../shaders/lib/erf.wgsl"),
            Lib::Half => include_str!("../../shaders/lib/half.wgsl"),
            Lib::Blocks => include_str!("../../shaders/lib/blocks.wgsl"),
            Lib::Tanh => include_str!("../../shaders/lib/tanh.wgsl"),
            Lib::Pow => include_str!("../../shaders/lib/pow.wgsl"),
            Lib::PowInt => include_str!("../../shaders/lib/pow_int.wgsl"),
            Lib::WorkgroupReduce => include_str!("../../shaders/lib/workgroup_reduce.wgsl"),
            Lib::SigmoidGrad => include_str!("../../shaders/lib/sigmoid_grad.wgsl"),
            Lib::TanhGrad => include_str!("../../shaders/lib/tanh_grad.wgsl"),
            Lib::GeluGrad => include_str!("../../shaders/lib/gelu_grad.wgsl"),
            Lib::GeluTanhGrad => include_str!("../../shaders/lib/gelu_tanh_grad.wgsl"),
            Lib::RowSoftmaxStats => include_str!("../../shaders/lib/row_softmax_stats.wgsl"),
            Lib::IsNan => include_str!("../../shaders/lib/is_nan.wgsl"),
            Lib::GatherPosition => include_str!("../../shaders/lib/gather_position.wgsl"),
        }
    }
}

/// Replaces every `{{KEY}}` in `template` by its value, in one pass (a value that happens to
/// contain braces is left alone). A placeholder without a value, or a value without a
/// placeholder, is a bug in the emitter and is reported as such: naga would otherwise report it
/// later, further from the cause.
pub fn render(template_name: &str, template: &str, values: &[(&str, String)]) -> Result<String> {
    let bug = |what: String| Error::gpu(format!("template {template_name}: {what} (emitter bug)"));
    let mut out = String::with_capacity(template.len() * 2);
    let mut used = vec![false; values.len()];
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| bug("unterminated placeholder".into()))?;
        let key = &after[..end];
        let i = values
            .iter()
            .position(|(k, _)| *k == key)
            .ok_or_else(|| bug(format!("placeholder {{{{{key}}}}} has no value")))?;
        used[i] = true;
        out.push_str(&values[i].1);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(bug(format!("no placeholder {{{{{}}}}}", values[i].0)));
    }
    Ok(out)
}

/// The placeholder values of one instance of a repeated section ([`repeat`]).
pub type Instance = Vec<(&'static str, String)>;

/// Repeats each section of `template` marked `{{#NAME}}` ... `{{/NAME}}` (each marker alone on
/// its line) once per entry of `instances`, filling the section's placeholders from that entry
/// ([`render`], which checks them); the marker lines go. A matmul kernel runs its K loop once
/// per product it sums (`kernels::matmul`): one instance renders the text the section holds.
pub fn repeat(
    template_name: &str,
    template: &str,
    name: &str,
    instances: &[Instance],
) -> Result<String> {
    let bug = |what: String| Error::gpu(format!("template {template_name}: {what} (emitter bug)"));
    let (open, close) = (format!("{{{{#{name}}}}}"), format!("{{{{/{name}}}}}"));
    let mut out = String::with_capacity(template.len() * 2);
    let mut rest = template;
    let mut found = false;
    // Byte offset of the start of the line holding `at`, and of the line after it.
    let line_start = |s: &str, at: usize| s[..at].rfind('\n').map_or(0, |i| i + 1);
    let line_end = |s: &str, at: usize| s[at..].find('\n').map_or(s.len(), |i| at + i + 1);
    while let Some(start) = rest.find(&open) {
        found = true;
        let body_start = line_end(rest, start);
        let end = (rest[body_start..].find(&close))
            .map(|i| body_start + i)
            .ok_or_else(|| bug(format!("section {open} is not closed")))?;
        let body_end = line_start(rest, end);
        out.push_str(&rest[..line_start(rest, start)]);
        for values in instances {
            out.push_str(&render(template_name, &rest[body_start..body_end], values)?);
        }
        rest = &rest[line_end(rest, end)..];
    }
    if !found {
        return Err(bug(format!("no section {open}")));
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_fills_and_checks_placeholders() {
        let t = "a {{X}} b {{Y}} {{X}}";
        let v = [("X", "1".to_string()), ("Y", "2".to_string())];
        assert_eq!(render("t", t, &v).unwrap(), "a 1 b 2 1");
        assert!(render("t", t, &v[..1]).is_err());
        assert!(render("t", "no placeholders", &v).is_err());
    }

    #[test]
    fn repeat_renders_a_section_per_instance_and_drops_the_markers() {
        // The template's own placeholders outside the section are left for `render`.
        let t = "head {{N}}\n  {{#LOOP}}\n  k{{S}} < K{{S}}\n  {{/LOOP}}\ntail\n";
        let one = [vec![("S", String::new())]];
        let expanded = repeat("t", t, "LOOP", &one).unwrap();
        assert_eq!(expanded, "head {{N}}\n  k < K\ntail\n");
        let two = [vec![("S", String::new())], vec![("S", "2".to_string())]];
        let expanded = repeat("t", t, "LOOP", &two).unwrap();
        assert_eq!(expanded, "head {{N}}\n  k < K\n  k2 < K2\ntail\n");
        // Every section is repeated; every placeholder in one needs a value of the instance.
        let t = "{{#LOOP}}\nk{{S}}\n{{/LOOP}}\n{{#LOOP}}\nj{{S}}\n{{/LOOP}}\n";
        assert_eq!(repeat("t", t, "LOOP", &two).unwrap(), "k\nk2\nj\nj2\n");
        assert!(repeat("t", "{{#LOOP}}\nk{{N}}\n{{/LOOP}}\n", "LOOP", &one).is_err());
        assert!(repeat("t", "{{#LOOP}}\nk\n", "LOOP", &one).is_err());
        assert!(repeat("t", "k", "LOOP", &one).is_err());
    }
}

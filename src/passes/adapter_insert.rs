//! The DoRA/LoRA rewrite: one rule that replaces a linear layer by its adapted form.
//!
//! For `y = x W0 (+ bias)` with W0 in [in, out] orientation (dora-math.md):
//!
//! ```text
//! u  = x W0 + s * (x A^T) B^T                      low-rank update, never forming B A
//! n² = ||W0[:, j]||² + 2s <(A W0)[:, j], B[j, :]> + s² B[j, :] (A A^T) B[j, :]^T
//! g  = m / stop_gradient(sqrt(max(n², 0)))          DoRA only
//! y  = u * g (+ bias, unscaled, as in PEFT)
//! ```
//!
//! The norm is factored so no [in, out] temporary exists; `||W0[:, j]||²` depends on frozen
//! weights only and constant folding computes it once. Gemm layers keep their own orientation
//! and alpha: the product `A W0` is a Gemm with the layer's `transB`.

use crate::error::{Error, Result, Subject};
use crate::ir::{
    rewrite, unary, AdaptedLayer, Binary, Graph, LinearKind, Method, NodeId, Op, Patch, PatchOps,
    PatchRef, Reduce, Rule,
};
use crate::passes::linear::LinearLayer;
use crate::tensor::{shape_str, Rng, Tensor};
use std::collections::HashMap;

/// Where an adapter's tensors come from.
#[derive(Clone, Debug)]
pub enum AdapterInit {
    /// PEFT's default initialisation (`init_lora_weights=True`), seeded: A ~ kaiming-uniform,
    /// B = 0, m = column norms of W0. The adapted model equals the base model.
    Peft { seed: u64 },
    /// Given tensors in PEFT orientation: A [r, in], B [out, r], m [out] (DoRA only).
    Tensors {
        a: Tensor,
        b: Tensor,
        m: Option<Tensor>,
    },
}

/// What to insert at one layer.
#[derive(Clone, Debug)]
pub struct AdapterSpec {
    pub layer: LinearLayer,
    pub method: Method,
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    pub init: AdapterInit,
}

/// Rewrites every layer in `specs` into its adapted form, recording each in `graph.adapters`.
pub fn insert_adapters(graph: &mut Graph, specs: Vec<AdapterSpec>) -> Result<usize> {
    // Training keeps each adapter parameter about six times (value, gradient, two Adam moments,
    // the reference executor's f64 copies): refuse a rank whose adapters could never fit.
    let params = specs.iter().try_fold(0usize, |acc, s| {
        s.rank
            .checked_mul(s.layer.in_features + s.layer.out_features)
            .and_then(|n| acc.checked_add(n))
    });
    let rank = specs.iter().map(|s| s.rank).max().unwrap_or(0);
    crate::tensor::check_size(&[params.unwrap_or(usize::MAX), 6], 8, || {
        format!("the adapters at rank {rank} (their parameters, gradients and optimizer state)")
    })?;
    let rule = InsertAdapter {
        specs: specs.into_iter().map(|s| (s.layer.node, s)).collect(),
    };
    rewrite(graph, &[&rule])
}

struct InsertAdapter {
    specs: HashMap<NodeId, AdapterSpec>,
}

impl Rule for InsertAdapter {
    fn name(&self) -> &str {
        "insert_adapter"
    }

    fn apply(&self, graph: &Graph, node: NodeId) -> Result<Option<PatchOps>> {
        match self.specs.get(&node) {
            Some(spec) => build(graph, spec).map(Some),
            None => Ok(None),
        }
    }
}

fn build(graph: &Graph, spec: &AdapterSpec) -> Result<PatchOps> {
    let l = &spec.layer;
    let (r, fin, fout) = (spec.rank, l.in_features, l.out_features);
    if r == 0 {
        return Err(Error::input_at(
            Subject::named("layer", &l.module),
            "rank must be at least 1",
        ));
    }
    // Before A [r, in] and B [out, r] are allocated: a huge --rank is refused, not attempted.
    crate::tensor::check_size(&[r, fin.max(fout)], 8, || {
        format!("the rank-{r} adapter of layer '{}'", l.module)
    })?;
    let base_label = graph.node(l.node).label.clone();
    let scope = match base_label.rfind('/') {
        Some(i) if i > 0 => base_label[..i].to_string(),
        _ => format!("/{}", l.module.replace('.', "/")),
    };
    let module = &l.module;
    let s = crate::ir::scale(spec.alpha, r, spec.rslora);
    let (alpha, beta, trans_a, trans_b) = match l.kind {
        LinearKind::MatMul | LinearKind::Embedding => (1.0f32, 1.0f32, false, false),
        LinearKind::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => (alpha, beta, trans_a, trans_b),
    };
    let w0 = graph
        .const_tensor(l.weight)
        .expect("linear layers have constant weights");

    let (a, b, m) = match &spec.init {
        AdapterInit::Peft { seed } => peft_init(w0, spec, alpha, trans_b, *seed),
        AdapterInit::Tensors { a, b, m } => {
            check(module, "lora_A", &a.shape, &[r, fin])?;
            check(module, "lora_B", &b.shape, &[fout, r])?;
            if let Some(m) = m {
                check(module, "lora_magnitude_vector", &m.shape, &[fout])?;
            }
            (a.clone(), b.clone(), m.clone())
        }
    };
    if spec.method == Method::Dora && m.is_none() {
        return Err(Error::input_at(
            Subject::named("layer", module),
            "a DoRA adapter needs a magnitude vector",
        ));
    }

    let mut p = Patch::new(graph);
    let name = |part: &str| format!("{module}.{part}");
    let label = |part: &str| format!("{scope}/{}/{part}", spec.method.name());
    let t01 = || Op::Transpose { perm: vec![1, 0] };
    let a_ref = p.constant(&format!("{module}.lora_A.weight"), a);
    let b_ref = p.constant(&format!("{module}.lora_B.weight"), b);
    let m_ref = m.map(|m| p.constant(&format!("{module}.lora_magnitude_vector"), m));
    let x: PatchRef = l.x.into();
    let w: PatchRef = l.weight.into();

    // Base product without the bias: the original node when it has no C.
    let base = match (&l.kind, l.bias) {
        (LinearKind::Gemm { .. }, Some(_)) => p.add(
            Op::Gemm {
                alpha,
                beta: 0.0,
                trans_a,
                trans_b,
            },
            &[x, w],
            &name("base"),
            &label("base"),
        )?,
        _ => l.node.into(),
    };

    // Low-rank path: s * (x A^T) B^T.
    let x_in = if trans_a {
        p.add(t01(), &[x], &name("x_t"), &label("x_t"))?
    } else {
        x
    };
    let a_t = p.add(t01(), &[a_ref], &name("lora_A_t"), &label("lora_A_t"))?;
    let b_t = p.add(t01(), &[b_ref], &name("lora_B_t"), &label("lora_B_t"))?;
    // An embedding's x A^T is a lookup of A^T's rows by the ids.
    let xa = match l.kind {
        LinearKind::Embedding => p.add(
            Op::Gather { axis: 0 },
            &[a_t, x_in],
            &name("xa"),
            &label("xa"),
        )?,
        _ => p.add(Op::MatMul, &[x_in, a_t], &name("xa"), &label("xa"))?,
    };
    let xab = p.add(Op::MatMul, &[xa, b_t], &name("xab"), &label("xab"))?;
    let s_ref = p.constant(&name("scaling"), Tensor::scalar(s as f32));
    let lowrank = p.add(
        Op::Binary(Binary::Mul),
        &[xab, s_ref],
        &name("lowrank"),
        &label("lowrank"),
    )?;
    let u = p.add(
        Op::Binary(Binary::Add),
        &[base, lowrank],
        &name("u"),
        &label("u"),
    )?;

    let mut y = u;
    let mut norm_sq_ref = None;
    if let (Method::Dora, Some(m_ref)) = (spec.method, m_ref) {
        let mul = Op::Binary(Binary::Mul);
        let add = Op::Binary(Binary::Add);
        let rsum = |axis: usize| Op::Reduce {
            kind: Reduce::Sum,
            axes: vec![axis],
            keepdims: false,
        };
        // ||W0[:, j]||², over the `in` axis of W as stored (alpha² folded in). One reduction of
        // squares: no [in, out] temporary even before constant folding.
        let in_axis = if trans_b { 1 } else { 0 };
        let sum_sq = Op::Reduce {
            kind: Reduce::SumSquare,
            axes: vec![in_axis],
            keepdims: false,
        };
        let mut w0_norm_sq = p.add(sum_sq, &[w], &name("w0_norm_sq"), &label("w0_norm_sq"))?;
        if alpha != 1.0 {
            let a2 = p.constant(&name("alpha_sq"), Tensor::scalar(alpha * alpha));
            w0_norm_sq = p.add(
                mul.clone(),
                &[w0_norm_sq, a2],
                &name("w0_norm_sq_scaled"),
                &label("w0_norm_sq_scaled"),
            )?;
        }
        // (A W0): [r, out], in the layer's own orientation.
        let a_w0 = match l.kind {
            LinearKind::MatMul | LinearKind::Embedding => {
                p.add(Op::MatMul, &[a_ref, w], &name("a_w0"), &label("a_w0"))?
            }
            LinearKind::Gemm { .. } => p.add(
                Op::Gemm {
                    alpha,
                    beta: 0.0,
                    trans_a: false,
                    trans_b,
                },
                &[a_ref, w],
                &name("a_w0"),
                &label("a_w0"),
            )?,
        };
        let cross_terms = p.add(
            mul.clone(),
            &[a_w0, b_t],
            &name("cross_terms"),
            &label("cross_terms"),
        )?;
        let cross = p.add(rsum(0), &[cross_terms], &name("cross"), &label("cross"))?;
        let a_at = p.add(Op::MatMul, &[a_ref, a_t], &name("a_at"), &label("a_at"))?;
        let b_a_at = p.add(
            Op::MatMul,
            &[b_ref, a_at],
            &name("b_a_at"),
            &label("b_a_at"),
        )?;
        let quad_terms = p.add(
            mul.clone(),
            &[b_a_at, b_ref],
            &name("quad_terms"),
            &label("quad_terms"),
        )?;
        let quad = p.add(rsum(1), &[quad_terms], &name("quad"), &label("quad"))?;
        let two_s = p.constant(&name("two_scaling"), Tensor::scalar((2.0 * s) as f32));
        let s_sq = p.constant(&name("scaling_sq"), Tensor::scalar((s * s) as f32));
        let cross_s = p.add(
            mul.clone(),
            &[cross, two_s],
            &name("cross_scaled"),
            &label("cross_scaled"),
        )?;
        let quad_s = p.add(
            mul.clone(),
            &[quad, s_sq],
            &name("quad_scaled"),
            &label("quad_scaled"),
        )?;
        let n_sq = p.add(
            add.clone(),
            &[w0_norm_sq, cross_s],
            &name("norm_sq_partial"),
            &label("norm_sq_partial"),
        )?;
        let n_sq = p.add(add, &[n_sq, quad_s], &name("norm_sq"), &label("norm_sq"))?;
        norm_sq_ref = Some(n_sq);
        // Rounding can push n² slightly below zero (dora-math.md clamps it at 0), and a column
        // of norm zero (a pruned neuron; PEFT divides 0 by 0 there, its issue #2049) has no
        // direction: such a norm reads as 1, so the scale is m itself (1 at init, see
        // `peft_init`) and neither the value nor any gradient is NaN. Non-zero norms pass
        // through unchanged: PEFT's values bit for bit.
        let n_sq = p.add(
            Op::Unary(unary::POSITIVE_OR_ONE),
            &[n_sq],
            &name("norm_sq_safe"),
            &label("norm_sq_safe"),
        )?;
        let norm = p.add(
            Op::Unary(unary::SQRT),
            &[n_sq],
            &name("norm"),
            &label("norm"),
        )?;
        let detached = p.add(
            Op::StopGradient,
            &[norm],
            &name("norm_detached"),
            &label("norm_detached"),
        )?;
        let g = p.add(
            Op::Binary(Binary::Div),
            &[m_ref, detached],
            &name("magnitude_scale"),
            &label("magnitude_scale"),
        )?;
        y = p.add(mul, &[u, g], &name("scaled"), &label("scaled"))?;
    }
    if let Some(bias) = l.bias {
        let mut c: PatchRef = bias.into();
        if beta != 1.0 {
            let beta_ref = p.constant(&name("beta"), Tensor::scalar(beta));
            c = p.add(
                Op::Binary(Binary::Mul),
                &[c, beta_ref],
                &name("bias_scaled"),
                &label("bias_scaled"),
            )?;
        }
        y = p.add(
            Op::Binary(Binary::Add),
            &[y, c],
            &name("out"),
            &label("out"),
        )?;
    }
    if p.shape(y) != graph.shape(l.node) {
        return Err(Error::shape_at(
            Subject::named("layer", module),
            format!(
                "adapted output {} differs from the original {}",
                shape_str(p.shape(y)),
                shape_str(graph.shape(l.node))
            ),
        ));
    }
    p.replace(l.node, y);
    p.record_adapter(AdaptedLayer {
        module: module.clone(),
        method: spec.method,
        rank: r,
        alpha: spec.alpha,
        rslora: spec.rslora,
        in_features: fin,
        out_features: fout,
        kind: l.kind.clone(),
        base_label,
        x,
        weight: w,
        bias: l.bias.map(PatchRef::Old),
        lora_a: a_ref,
        lora_b: b_ref,
        magnitude: m_ref,
        output: y,
        norm_sq: norm_sq_ref,
    });
    Ok(p.finish())
}

fn check(module: &str, what: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        let tensor = Subject::named("tensor", format!("{module}.{what}"));
        return Err(Error::shape_mismatch(tensor, got, want));
    }
    Ok(())
}

/// PEFT's `init_lora_weights=True`: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with
/// a = sqrt(5)), B = 0, m = ||alpha * W0[:, j]||. The seed is mixed with the module name so each
/// layer draws its own stream and adding a layer does not change the others.
fn peft_init(
    w0: &Tensor,
    spec: &AdapterSpec,
    alpha: f32,
    trans_b: bool,
    seed: u64,
) -> (Tensor, Tensor, Option<Tensor>) {
    let l = &spec.layer;
    let (r, fin, fout) = (spec.rank, l.in_features, l.out_features);
    let mut rng = Rng::new(seed ^ fnv1a(&l.module));
    let bound = 1.0 / (fin as f64).sqrt();
    let a: Vec<f32> = (0..r * fin)
        .map(|_| rng.range(-bound, bound) as f32)
        .collect();
    let b = vec![0.0f32; fout * r];
    let m = (spec.method == Method::Dora).then(|| column_norms(w0, fin, fout, alpha, trans_b));
    (
        Tensor::f32(vec![r, fin], a),
        Tensor::f32(vec![fout, r], b),
        m,
    )
}

/// DoRA's magnitude at PEFT's initialisation for `layer`: `‖W0[:, j]‖` per output column j
/// (times a Gemm's |alpha|); a zero column gets 1 (see `column_norms`).
pub fn base_magnitude(graph: &Graph, layer: &LinearLayer) -> Tensor {
    let (alpha, trans_b) = match layer.kind {
        LinearKind::Gemm { alpha, trans_b, .. } => (alpha, trans_b),
        LinearKind::MatMul | LinearKind::Embedding => (1.0, false),
    };
    let w0 = graph
        .const_tensor(layer.weight)
        .expect("linear layers have constant weights");
    column_norms(w0, layer.in_features, layer.out_features, alpha, trans_b)
}

fn column_norms(w0: &Tensor, fin: usize, fout: usize, alpha: f32, trans_b: bool) -> Tensor {
    // Squared column norms in f64, read straight from W0's f32 values (a large model's
    // weights are a map of its file: no f64 copy of them; a quantized one's are decoded for
    // this and not kept), row by row.
    let mut sq = vec![0f64; fout];
    w0.with_f32(|w| {
        if trans_b {
            // W0 [out, in]: column j of the layer is row j.
            for (j, row) in w.chunks_exact(fin).enumerate() {
                sq[j] = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
            }
        } else {
            for row in w.chunks_exact(fout) {
                for (s, &v) in sq.iter_mut().zip(row) {
                    *s += (v as f64) * (v as f64);
                }
            }
        }
    });
    let norms: Vec<f32> = sq
        .into_iter()
        .map(|sq| {
            // A zero column gets magnitude 1, not its norm 0: with the norm read as 1 (see
            // the rewrite above) its scale is 1, the layer computes the base output, and B
            // still receives LoRA's gradient there.
            if sq > 0.0 {
                (alpha.abs() as f64 * sq.sqrt()) as f32
            } else {
                1.0
            }
        })
        .collect();
    Tensor::f32(vec![fout], norms)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

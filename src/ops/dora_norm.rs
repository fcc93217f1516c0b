//! `dora_norm_sq`: the squared column norms of a DoRA layer's adapted weight, in one op.
//!
//! Inputs W (the layer's frozen weight as stored: [in, out], or [out, in] with `weight_out_in`,
//! Gemm's transB), A [r, in], B [out, r]; attributes `alpha` (Gemm's alpha, 1 for MatMul) and
//! `scale` (s). Output [out]:
//!
//! ```text
//! n²[j] = || alpha W[:, j] + s (B A)[j, :] ||²      (W in [in, out] orientation)
//! ```
//!
//! the same value as the factored form `||W0[:, j]||² + 2s <(A W0)[:, j], B[j, :]> +
//! s² B[j, :](A Aᵀ)B[j, :]ᵀ` (dora-math.md), computed column by column: for column j the kernel
//! forms `v = B[j, :] A` (in values, never stored) and sums `(alpha W[i, j] + s v[i])²`. No
//! [in, out] temporary exists, the whole norm is one dispatch, and no cancellation between the
//! three factored terms can occur. Training uses it ([`crate::train`] replaces each DoRA layer's
//! factored norm by it); ONNX export never sees it.
//!
//! Gradient (exact-norm mode), with `g` the cotangent of n² and `D = alpha W + s (B A)ᵀ`:
//!
//! ```text
//! dA = 2s (g ⊙ B)ᵀ Dᵀ = 2s (alpha (g ⊙ B)ᵀ Wᵀ + s ((g ⊙ B)ᵀ B) A)
//! dB = 2s g ⊙ (D A ᵀ)ᵀ = 2s g ⊙ (alpha Wᵀ Aᵀ + s B (A Aᵀ))
//! ```
//!
//! (`g ⊙ B` scales row j of B by g[j]); W is frozen and gets none.

use crate::error::{Error, Result, Subject};
use crate::ir::{Binary, Op, PatchRef};
use crate::passes::autodiff::Builder;
use crate::tensor::{shape_str, Array};

/// The attributes of [`Op::DoraNormSq`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DoraNorm {
    pub alpha: f32,
    pub scale: f32,
    /// W is stored [out, in] (Gemm with transB) rather than [in, out].
    pub weight_out_in: bool,
}

impl DoraNorm {
    /// (in, out) of a weight of shape `w`.
    pub fn in_out(&self, w: &[usize]) -> (usize, usize) {
        if self.weight_out_in {
            (w[1], w[0])
        } else {
            (w[0], w[1])
        }
    }

    /// The output shape [out], after checking W, A and B agree.
    pub fn shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        let (w, a, b) = (inputs[0], inputs[1], inputs[2]);
        let bad = || {
            Err(Error::shape(format!(
                "dora_norm_sq: weight {}{}, A {} and B {} do not form a rank-r adapter",
                shape_str(w),
                if self.weight_out_in {
                    " (out x in)"
                } else {
                    ""
                },
                shape_str(a),
                shape_str(b)
            )))
        };
        if w.len() != 2 || a.len() != 2 || b.len() != 2 {
            return bad();
        }
        let (fin, fout) = self.in_out(w);
        if a[1] != fin || b[0] != fout || a[0] != b[1] {
            return bad();
        }
        Ok(vec![fout])
    }

    /// The f64 reference.
    pub fn eval(&self, w: &Array, a: &Array, b: &Array) -> Array {
        let (fin, fout) = self.in_out(&w.shape);
        let r = a.shape[0];
        let (alpha, s) = (self.alpha as f64, self.scale as f64);
        let out = (0..fout)
            .map(|j| {
                (0..fin)
                    .map(|i| {
                        let wij = if self.weight_out_in {
                            w.data[j * fin + i]
                        } else {
                            w.data[i * fout + j]
                        };
                        let v: f64 = (0..r)
                            .map(|k| b.data[j * r + k] * a.data[k * fin + i])
                            .sum();
                        let d = alpha * wij + s * v;
                        d * d
                    })
                    .sum()
            })
            .collect();
        Array::new(vec![fout], out)
    }

    /// The cotangents of (W, A, B) given `g`, the cotangent of the output (module docs).
    pub(crate) fn grad(
        &self,
        bld: &mut Builder,
        n: PatchRef,
        ins: &[PatchRef],
        g: PatchRef,
        wanted: &[bool],
    ) -> Result<Vec<Option<PatchRef>>> {
        if wanted[0] {
            return Err(Error::graph_at(
                Subject::named("node", bld.label(n)),
                "dora_norm_sq gives no gradient for the frozen weight",
            ));
        }
        let (w, a, b) = (ins[0], ins[1], ins[2]);
        let fout = bld.shape(b)[0];
        let t = |bld: &mut Builder, x: PatchRef, tag: &str| {
            bld.add(Op::Transpose { perm: vec![1, 0] }, &[x], n, tag)
        };
        let mm = |bld: &mut Builder, x: PatchRef, y: PatchRef, tag: &str| {
            bld.add(Op::MatMul, &[x, y], n, tag)
        };
        // Wᵀ: [out, in].
        let w_t = if self.weight_out_in {
            w
        } else {
            t(bld, w, "w_t")?
        };
        let g_col = bld.reshape(g, &[fout, 1], n, "g_col")?;
        let two_s = 2.0 * self.scale as f64;
        let mut out = vec![None, None, None];
        if wanted[1] {
            // 2s (alpha (g⊙B)ᵀ Wᵀ + s ((g⊙B)ᵀ B) A)
            let gb = bld.binary(Binary::Mul, b, g_col, n, "g_b")?;
            let gb_t = t(bld, gb, "g_b_t")?;
            let w_term = mm(bld, gb_t, w_t, "da_w")?;
            let gram = mm(bld, gb_t, b, "da_gram")?;
            let lr_term = mm(bld, gram, a, "da_lowrank")?;
            out[1] = Some(combine(bld, n, w_term, lr_term, self, two_s, "da")?);
        }
        if wanted[2] {
            // 2s g ⊙ (alpha Wᵀ Aᵀ + s B (A Aᵀ))
            let a_t = t(bld, a, "a_t")?;
            let w_term = mm(bld, w_t, a_t, "db_w")?;
            let aat = mm(bld, a, a_t, "db_aat")?;
            let lr_term = mm(bld, b, aat, "db_lowrank")?;
            let sum = combine(bld, n, w_term, lr_term, self, two_s, "db_sum")?;
            out[2] = Some(bld.binary(Binary::Mul, sum, g_col, n, "db")?);
        }
        Ok(out)
    }
}

/// `2s (alpha w_term + s lr_term)`, as `(2s alpha) w_term + (2s²) lr_term`.
fn combine(
    bld: &mut Builder,
    n: PatchRef,
    w_term: PatchRef,
    lr_term: PatchRef,
    p: &DoraNorm,
    two_s: f64,
    tag: &str,
) -> Result<PatchRef> {
    let c_w = bld.scalar(two_s * p.alpha as f64, n, &format!("{tag}_c_w"));
    let c_lr = bld.scalar(two_s * p.scale as f64, n, &format!("{tag}_c_lr"));
    let x = bld.binary(Binary::Mul, w_term, c_w, n, &format!("{tag}_w"))?;
    let y = bld.binary(Binary::Mul, lr_term, c_lr, n, &format!("{tag}_lr"))?;
    bld.binary(Binary::Add, x, y, n, tag)
}

//! Small pieces of WGSL text that every kernel needs: literals, index arithmetic with baked-in
//! strides, binding declarations, and the workgroup grid.

use crate::error::{Error, Result, Subject};
use crate::tensor::{shape_str, strides};

/// A WGSL `f32` literal that reads back as exactly `v` (Rust's shortest round-trip form).
pub fn f32_lit(v: f32) -> Result<String> {
    if !v.is_finite() {
        return Err(Error::gpu(format!(
            "cannot bake the non-finite constant {v} into a shader"
        )));
    }
    Ok(format!("{v:?}"))
}

/// A WGSL `u32` literal.
pub fn u32_lit(v: usize) -> String {
    format!("{v}u")
}

/// The flat offset, as a WGSL expression of `var`, of the element that row-major index `var` of
/// an index space of extents `shape` maps to when dim `d` advances by `muls[d]` elements (0: the
/// dim does not move, as for a broadcast dim). Broadcasting, transposes, reductions and batch
/// offsets are all this one formula with different multipliers.
///
/// The text is kept short so kernels stay readable: unit dims vanish, neighbouring dims that are
/// contiguous in both spaces merge (so an unbroadcast operand reads `i`), and the outermost
/// dim needs no modulo because `var` is in range.
pub fn strided_index(var: &str, shape: &[usize], muls: &[usize]) -> String {
    debug_assert_eq!(shape.len(), muls.len());
    // An index into an empty range is never evaluated (no element has it); its strides would be
    // zero, and a division by a zero constant is invalid WGSL.
    if shape.contains(&0) {
        return "0u".to_string();
    }
    // (extent, mul) per dim, unit dims dropped, contiguous neighbours merged.
    let mut dims: Vec<(usize, usize)> = Vec::new();
    for (&e, &m) in shape.iter().zip(muls) {
        if e == 1 {
            continue;
        }
        if let Some(last) = dims.last_mut() {
            let both_fixed = last.1 == 0 && m == 0;
            let contiguous = m != 0 && last.1 == m * e;
            if both_fixed || contiguous {
                *last = (last.0 * e, m);
                continue;
            }
        }
        dims.push((e, m));
    }
    let extents: Vec<usize> = dims.iter().map(|d| d.0).collect();
    let var_strides = strides(&extents);
    let mut terms = Vec::new();
    for (d, &(extent, mul)) in dims.iter().enumerate() {
        if mul == 0 {
            continue;
        }
        let mut t = if var_strides[d] == 1 {
            var.to_string()
        } else {
            format!("({var} / {})", u32_lit(var_strides[d]))
        };
        if d > 0 {
            t = format!("{t} % {}", u32_lit(extent));
        }
        if mul != 1 {
            t = format!("{t} * {}", u32_lit(mul));
        }
        terms.push(t);
    }
    if terms.is_empty() {
        "0u".into()
    } else {
        terms.join(" + ")
    }
}

/// The multipliers that make [`strided_index`] read an operand of shape `from` that numpy-
/// broadcasts to `to`: the operand's strides, 0 on dims it lacks or has as 1.
pub fn broadcast_muls(from: &[usize], to: &[usize]) -> Vec<usize> {
    broadcast_strides(from, &strides(from), to)
}

/// [`broadcast_muls`] for an operand laid out with element strides `from_strides` per dim
/// (a transpose read in place walks its source with permuted strides).
pub fn broadcast_strides(from: &[usize], from_strides: &[usize], to: &[usize]) -> Vec<usize> {
    let offset = to.len() - from.len();
    (0..to.len())
        .map(|d| {
            if d < offset || from[d - offset] == 1 {
                0
            } else {
                from_strides[d - offset]
            }
        })
        .collect()
}

/// The flat index into an operand of shape `from` that numpy-broadcasts to `to`, for flat index
/// `var` of `to`.
pub fn broadcast_index(var: &str, from: &[usize], to: &[usize]) -> String {
    strided_index(var, to, &broadcast_muls(from, to))
}

/// A note for the comment next to a load: how the operand's shape relates to the output's.
pub fn broadcast_note(from: &[usize], to: &[usize]) -> String {
    if from == to {
        String::new()
    } else {
        format!(" // {} broadcast to {}", shape_str(from), shape_str(to))
    }
}

/// One storage binding of a kernel: its WGSL name, and the value it holds (for the comment).
pub struct Binding {
    pub name: String,
    pub value: String,
    pub shape: Vec<usize>,
    /// Stored other than as f32 in `u32` words (see `storage`), as this says.
    pub packed: Option<String>,
    /// Buffers in the binding: above 1, a binding array of that many buffers of this one's
    /// shape and storage (`value` names the first), read as `name[k].v[i]`.
    pub count: usize,
    /// Declared `array<vec4<f32>>` and read four values at a time (a matmul's B whose rows of
    /// four are contiguous and aligned: `kernels`' quad loads).
    pub quads: bool,
}

/// The kernel's bindings: read-only inputs, then the read-write outputs (the group's value
/// first, then interior values it also writes). A binding array's buffers are `struct`s of one
/// runtime-sized array (naga takes binding arrays of structs only). The bindings must be the
/// template's first declarations.
pub fn bindings(inputs: &[Binding], outputs: &[Binding]) -> String {
    let mut s = String::new();
    let arrays: std::collections::BTreeSet<&str> = (inputs.iter())
        .filter(|b| b.count > 1)
        .map(|b| if b.packed.is_some() { "u32" } else { "f32" })
        .collect();
    if !arrays.is_empty() {
        // Binding arrays are a wgpu extension of WGSL, enabled before any declaration.
        s += "enable wgpu_binding_array;\n";
    }
    for elem in arrays {
        let name = if elem == "u32" { "Words" } else { "Floats" };
        s += &format!("struct {name} {{ v: array<{elem}> }}\n");
    }
    for (i, b) in inputs.iter().enumerate() {
        let (elem, note) = match (&b.packed, b.quads) {
            (Some(h), _) => ("u32", format!(", {h}")),
            (None, true) => ("vec4<f32>", ", read as vec4s".to_string()),
            (None, false) => ("f32", String::new()),
        };
        let ty = match (b.count, elem) {
            (1, _) => format!("array<{elem}>"),
            (n, "u32") => format!("binding_array<Words, {n}>"),
            (n, _) => format!("binding_array<Floats, {n}>"),
        };
        let first = if b.count > 1 {
            " (the first of them)"
        } else {
            ""
        };
        s += &format!(
            "@group(0) @binding({i}) var<storage, read> {}: {ty}; // '{}'{first} {}{note}\n",
            b.name,
            comment_safe(&b.value),
            shape_str(&b.shape)
        );
    }
    let outputs: Vec<String> = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            format!(
                "@group(0) @binding({}) var<storage, read_write> {}: array<f32>; // '{}' {}",
                inputs.len() + i,
                o.name,
                comment_safe(&o.value),
                shape_str(&o.shape)
            )
        })
        .collect();
    s += &outputs.join("\n");
    s
}

/// Text that can sit in a `//` comment: no line breaks or other control characters.
pub fn comment_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The dispatch grid for `total` workgroups: along x up to `max` per dimension, spilling into y
/// and then z. Kernels recover the linear workgroup index as `(z * GRID_Y + y) * GRID_X + x`
/// and ignore the few past `total`.
pub fn grid(total: usize, max: u32, what: &str) -> Result<[u32; 3]> {
    let max = max.max(1) as usize;
    if total == 0 {
        return Ok([0, 0, 0]);
    }
    let x = total.min(max);
    let y = total.div_ceil(x).min(max);
    let z = total.div_ceil(x * y);
    if z > max {
        return Err(Error::gpu_at(
            Subject::context(what),
            format!("{total} workgroups do not fit a {max}x{max}x{max} dispatch"),
        ));
    }
    Ok([x as u32, y as u32, z as u32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_expressions_stay_short() {
        assert_eq!(broadcast_index("i", &[3, 5], &[3, 5]), "i");
        assert_eq!(broadcast_index("i", &[5], &[3, 5]), "i % 5u");
        assert_eq!(broadcast_index("i", &[3, 1], &[3, 5]), "(i / 5u)");
        assert_eq!(broadcast_index("i", &[], &[3, 5]), "0u");
        assert_eq!(broadcast_index("i", &[1, 1], &[3, 5]), "0u");
        assert_eq!(
            broadcast_index("i", &[2, 1, 4], &[2, 3, 4]),
            "(i / 12u) * 4u + i % 4u"
        );
        // Transpose 2x3 -> 3x2: out (j, i) reads in[i * 3 + j].
        assert_eq!(
            strided_index("i", &[3, 2], &[1, 3]),
            "(i / 2u) + i % 2u * 3u"
        );
    }

    #[test]
    fn grid_spills_into_y_and_z() {
        assert_eq!(grid(10, 4, "k").unwrap(), [4, 3, 1]);
        assert_eq!(grid(60, 4, "k").unwrap(), [4, 4, 4]);
        assert!(grid(65, 4, "k").is_err());
        assert_eq!(grid(66_406, 65_535, "k").unwrap(), [65_535, 2, 1]);
        assert_eq!(grid(0, 65_535, "k").unwrap(), [0, 0, 0]);
    }
}

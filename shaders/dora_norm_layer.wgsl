// {{LAYER}}: this invocation's share of the squared norms of output features j0 .. j0 + ROWS.
fn {{L}}partial_norms(j0: u32, lid: u32) -> array<f32, ROWS> {
    // The output features this workgroup loads, clamped to the last one.
    var js: array<u32, ROWS>;
    for (var jr = 0u; jr < ROWS; jr = jr + 1u) {
        js[jr] = min(j0 + jr, OUT - 1u);
    }
    // part[jr]: this invocation's share of || ALPHA W[:, j0 + jr] + S (B A)[j0 + jr, :] ||².
    var part: array<f32, ROWS>;
    for (var t0 = 0u; t0 < IN; t0 = t0 + TILE) {
        let i0 = t0 + 4u * lid;
        // The input features of this tile that this invocation owns (clamped), and which of
        // them are real.
        var feats: array<vec4<u32>, VECS>;
        var real: array<vec4<f32>, VECS>;
        for (var ci = 0u; ci < VECS; ci = ci + 1u) {
            let f = vec4<u32>(i0) + 4u * WG * ci + vec4<u32>(0u, 1u, 2u, 3u);
            feats[ci] = min(f, vec4<u32>(IN - 1u));
            real[ci] = select(vec4<f32>(0.0), vec4<f32>(1.0), f < vec4<u32>(IN));
        }
        // ba[jr][ci][e] = (B A)[j0 + jr, feats[ci][e]].
        var ba: array<array<vec4<f32>, VECS>, ROWS>;
        for (var k = 0u; k < R; k = k + 1u) {
            var av: array<vec4<f32>, VECS>;
            for (var ci = 0u; ci < VECS; ci = ci + 1u) {
                let f = k * IN + feats[ci];
                av[ci] = vec4<f32>({{L}}lora_a[f.x], {{L}}lora_a[f.y], {{L}}lora_a[f.z], {{L}}lora_a[f.w]);
            }
            for (var jr = 0u; jr < ROWS; jr = jr + 1u) {
                let bv = vec4<f32>({{L}}lora_b[js[jr] * R + k]);
                for (var ci = 0u; ci < VECS; ci = ci + 1u) {
                    ba[jr][ci] = fma(bv, av[ci], ba[jr][ci]);
                }
            }
        }
        for (var jr = 0u; jr < ROWS; jr = jr + 1u) {
            for (var ci = 0u; ci < VECS; ci = ci + 1u) {
                let f = feats[ci];
                let j = js[jr];
                let wv = vec4<f32>({{L}}w_get(f.x, j), {{L}}w_get(f.y, j), {{L}}w_get(f.z, j), {{L}}w_get(f.w, j));
                let d = (ALPHA * wv + S * ba[jr][ci]) * real[ci];
                part[jr] = part[jr] + dot(d, d);
            }
        }
    }
    return part;
}

// {{LAYER}}: the epilogue of output feature i, from its squared norm `acc`.
fn {{L}}finish(i: u32, acc: f32) {
{{EPILOGUE}}
}

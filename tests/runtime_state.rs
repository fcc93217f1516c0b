//! Persistent state on the device (`Graph::updates`), the step/write/read API of `Executable`,
//! and the planner's buffer reuse. These tests need a GPU adapter and FAIL without one, like
//! every GPU test (lavapipe is enough: `scripts/install-vulkan.sh`).

mod common;

use common::gpu;
use dorac::codegen::{self, BufferRole, Plan, PlanOptions};
use dorac::ir::{unary, Binary, Graph, GraphBuilder, NodeId, Op, Reduce};
use dorac::reference;
use dorac::runtime::Executable;
use dorac::tensor::{relative_error, Array, Tensor};
use std::collections::HashMap;

fn add(g: &mut GraphBuilder, op: Op, inputs: &[NodeId], name: &str) -> NodeId {
    g.add(op, inputs, name, name).unwrap()
}

/// A hand-built training step: state p [4], input g [4];
/// `p <- p - 0.1 * g`, and the output `loss = sum(p * p)` (of p before the update).
fn sgd_step() -> GraphBuilder {
    let mut g = GraphBuilder::new();
    let p = g.add_input("p", vec![4]);
    let grad = g.add_input("g", vec![4]);
    let lr = g.add_const("lr", Tensor::scalar(0.1));
    let step = add(&mut g, Op::Binary(Binary::Mul), &[lr, grad], "lr_g");
    let next = add(&mut g, Op::Binary(Binary::Sub), &[p, step], "p_next");
    let sq = add(&mut g, Op::Binary(Binary::Mul), &[p, p], "p_sq");
    let loss = add(
        &mut g,
        Op::Reduce {
            kind: Reduce::Sum,
            axes: vec![0],
            keepdims: false,
        },
        &[sq],
        "loss",
    );
    g.add_output("loss", loss);
    g.add_update(p, next);
    g
}

fn build(g: &Graph) -> (Plan, Executable) {
    build_with(g, &PlanOptions::default())
}

/// Without fusion, element-wise chains keep one kernel and one intermediate per node: the
/// reuse tests need those intermediates.
fn unfused() -> PlanOptions {
    PlanOptions {
        fuse: false,
        ..PlanOptions::default()
    }
}

fn build_with(g: &Graph, options: &PlanOptions) -> (Plan, Executable) {
    let plan = codegen::plan_with(g, options).unwrap();
    let exe = Executable::new(gpu(), &plan, g).unwrap_or_else(|e| panic!("{e}\n{plan}"));
    (plan, exe)
}

fn close(got: &[f32], want: &[f64], what: &str) {
    let g: Vec<f64> = got.iter().map(|&x| x as f64).collect();
    let err = relative_error(&g, want);
    println!("relerr {what} {err:.3e}");
    assert!(err <= 1e-6, "{what}: got {got:?}, want {want:?} ({err:e})");
}

fn feeds(pairs: &[(&str, &[f32])]) -> HashMap<String, Vec<f32>> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect()
}

#[test]
fn step_updates_the_state_on_the_device() {
    let g = sgd_step();
    let (plan, exe) = build(&g);
    let text = plan.to_string();
    println!("{text}");
    assert_eq!(plan.states.len(), 1);
    assert_eq!(plan.copies.len(), 1, "{text}");
    assert!(
        text.contains("state updates, after the kernels:")
            && text.contains("copy b")
            && text.contains("-> b0 'p' (16 bytes)"),
        "{text}"
    );
    assert!(
        text.contains("b0   'p'") && text.contains("state"),
        "{text}"
    );

    let p0 = [1.0f32, -2.0, 0.5, 3.0];
    exe.write("p", &p0).unwrap();
    assert_eq!(exe.read("p").unwrap(), p0);
    // The f64 recurrence on the f32 values.
    let mut p: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
    let grads: [[f32; 4]; 3] = [
        [0.5, 1.0, -1.0, 2.0],
        [-3.0, 0.25, 0.0, 1.5],
        [1.0, 1.0, 1.0, 1.0],
    ];
    for (k, grad) in grads.iter().enumerate() {
        let out = exe.step(&feeds(&[("g", grad)]), &["loss"]).unwrap();
        // Only what was fetched comes back.
        assert_eq!(out.keys().collect::<Vec<_>>(), ["loss"]);
        let loss: f64 = p.iter().map(|v| v * v).sum();
        close(&out["loss"], &[loss], &format!("loss step {k}"));
        for (v, &d) in p.iter_mut().zip(grad) {
            *v -= 0.1f32 as f64 * d as f64;
        }
        close(&exe.read("p").unwrap(), &p, &format!("p after step {k}"));
    }
    // A step without g reuses the last one written; reading it gives it back.
    assert_eq!(exe.read("g").unwrap(), grads[2]);
    let out = exe.step(&HashMap::new(), &["loss"]).unwrap();
    let loss: f64 = p.iter().map(|v| v * v).sum();
    close(&out["loss"], &[loss], "loss step 3");
    for v in p.iter_mut() {
        *v -= 0.1f32 as f64;
    }
    close(&exe.read("p").unwrap(), &p, "p after step 3");
    // The last loss can be read back too.
    close(&exe.read("loss").unwrap(), &[loss], "read loss");
    // Writing the state resets it.
    exe.write("p", &[0.0; 4]).unwrap();
    let out = exe.step(&HashMap::new(), &["loss"]).unwrap();
    assert_eq!(out["loss"], [0.0]);
    close(
        &exe.read("p").unwrap(),
        &[-0.1f32 as f64; 4],
        "p after reset",
    );
}

#[test]
fn run_on_a_graph_with_state_is_a_step_fetching_everything() {
    let mut g = sgd_step();
    let p = g.inputs()[0];
    g.add_output("p_out", p); // an output that is the state itself
    let (_, exe) = build(&g);
    exe.write("p", &[1.0, 2.0, 3.0, 4.0]).unwrap();
    let out = exe.run(&feeds(&[("g", &[10.0; 4])])).unwrap();
    assert_eq!(out.len(), 2);
    close(&out["loss"], &[30.0], "loss");
    // Outputs are this step's values: the state before its update.
    assert_eq!(out["p_out"], [1.0, 2.0, 3.0, 4.0]);
    close(&exe.read("p").unwrap(), &[0.0, 1.0, 2.0, 3.0], "p");
    let out = exe.run(&HashMap::new()).unwrap();
    close(&out["loss"], &[14.0], "loss 2");
    // The same on the reference executor, which takes the state as an input.
    let inputs: HashMap<String, Array> = [
        (
            "p".to_string(),
            Array::new(vec![4], vec![0.0, 1.0, 2.0, 3.0]),
        ),
        ("g".to_string(), Array::new(vec![4], vec![10.0; 4])),
    ]
    .into();
    let want = reference::run(&g, &inputs).unwrap();
    close(&out["loss"], &want["loss"].data, "loss vs reference");
}

#[test]
fn step_errors_name_what_is_wrong() {
    let g = sgd_step();
    let (_, exe) = build(&g);
    let err = |r: dorac::Result<HashMap<String, Vec<f32>>>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    let g4 = feeds(&[("g", &[0.0; 4])]);
    // The state was never written.
    let e = err(exe.step(&g4, &["loss"]));
    assert!(
        e.contains("'p'") && e.contains("not initialised") && e.contains("write"),
        "{e}"
    );
    let e = err(exe.run(&g4));
    assert!(e.contains("'p'") && e.contains("not initialised"), "{e}");
    let e = exe.read("p").unwrap_err().to_string();
    assert!(e.contains("'p' has no value yet"), "{e}");
    let e = exe.read("loss").unwrap_err().to_string();
    assert!(e.contains("'loss' has no value yet"), "{e}");
    exe.write("p", &[1.0; 4]).unwrap();
    // A non-state input never given.
    let e = err(exe.step(&HashMap::new(), &["loss"]));
    assert!(e.contains("missing input(s) 'g' (4)"), "{e}");
    // Unknown names, wrong lengths.
    let e = err(exe.step(&feeds(&[("g", &[0.0; 4]), ("h", &[0.0])]), &["loss"]));
    assert!(
        e.contains("unknown input") && e.contains("\"h\"") && e.contains("\"p\""),
        "{e}"
    );
    let e = err(exe.step(&feeds(&[("g", &[0.0; 3])]), &["loss"]));
    assert!(
        e.contains("'g' has 3 values") && e.contains("needs 4"),
        "{e}"
    );
    let e = err(exe.step(&g4, &["los"]));
    assert!(
        e.contains("cannot fetch 'los'") && e.contains("\"loss\""),
        "{e}"
    );
    let e = exe.write("q", &[0.0; 4]).unwrap_err().to_string();
    assert!(e.contains("cannot write 'q'") && e.contains("\"p\""), "{e}");
    let e = exe.write("p", &[0.0; 5]).unwrap_err().to_string();
    assert!(
        e.contains("'p' has 5 values") && e.contains("needs 4"),
        "{e}"
    );
    let e = exe.read("nope").unwrap_err().to_string();
    assert!(
        e.contains("cannot read 'nope'") && e.contains("\"g\"") && e.contains("\"loss\""),
        "{e}"
    );
    // Nothing above changed the state, and the failed step wrote nothing.
    assert_eq!(exe.read("p").unwrap(), [1.0; 4]);
    let e = exe.read("g").unwrap_err().to_string();
    assert!(e.contains("'g' has no value yet"), "{e}");
    let out = exe.step(&g4, &[]).unwrap();
    assert!(out.is_empty());
    assert_eq!(exe.read("p").unwrap(), [1.0; 4]);
}

/// A state whose next value is a view (Reshape of an Identity of a kernel's output), one whose
/// next value is itself (no copy), and two states that swap values (the copy reads a snapshot).
#[test]
fn state_next_values_through_views_and_swaps() {
    let mut g = GraphBuilder::new();
    let q = g.add_input("q", vec![2, 2]);
    let flat = add(&mut g, Op::Reshape { shape: vec![4] }, &[q], "q_flat");
    let half = g.add_const("half", Tensor::scalar(0.5));
    let one = g.add_const("one", Tensor::scalar(1.0));
    let scaled = add(&mut g, Op::Binary(Binary::Mul), &[flat, half], "q_half");
    let moved = add(&mut g, Op::Binary(Binary::Add), &[scaled, one], "q_moved");
    let same = add(&mut g, Op::Identity, &[moved], "q_same");
    let next_q = add(&mut g, Op::Reshape { shape: vec![2, 2] }, &[same], "q_next");
    let fixed = g.add_input("fixed", vec![3]);
    let fixed_next = add(&mut g, Op::StopGradient, &[fixed], "fixed_next");
    let a = g.add_input("a", vec![2]);
    let b = g.add_input("b", vec![2]);
    let total = add(&mut g, Op::Binary(Binary::Add), &[a, b], "total");
    g.add_output("total", total);
    g.set_updates(vec![(q, next_q), (fixed, fixed_next), (a, b), (b, a)]);
    let (plan, exe) = build(&g);
    let text = plan.to_string();
    println!("{text}");
    // q's next value is read from the kernel's buffer; `fixed` needs no copy; the swap goes
    // through one snapshot.
    let moved_buffer = plan.node_buffers[&moved];
    assert!(
        plan.copies
            .iter()
            .any(|c| c.from == moved_buffer && c.to == plan.node_buffers[&q]),
        "{text}"
    );
    assert!(
        text.contains("'fixed' is its own next value: no copy"),
        "{text}"
    );
    assert_eq!(plan.copies.len(), 4, "{text}");
    assert_eq!(
        text.matches("(before the update)' (8 bytes)").count(),
        1,
        "{text}"
    );

    exe.write("q", &[1.0, 2.0, 3.0, 4.0]).unwrap();
    exe.write("fixed", &[7.0, 8.0, 9.0]).unwrap();
    exe.write("a", &[1.0, 2.0]).unwrap();
    exe.write("b", &[10.0, 20.0]).unwrap();
    let mut q_want = [1.0f32, 2.0, 3.0, 4.0];
    for k in 0..3 {
        let out = exe.step(&HashMap::new(), &["total"]).unwrap();
        assert_eq!(out["total"], [11.0, 22.0]);
        for v in q_want.iter_mut() {
            *v = *v * 0.5 + 1.0;
        }
        assert_eq!(exe.read("q").unwrap(), q_want, "step {k}");
        assert_eq!(exe.read("fixed").unwrap(), [7.0, 8.0, 9.0]);
        let (a_now, b_now) = (exe.read("a").unwrap(), exe.read("b").unwrap());
        if k % 2 == 0 {
            assert_eq!(
                (a_now, b_now),
                (vec![10.0, 20.0], vec![1.0, 2.0]),
                "step {k}"
            );
        } else {
            assert_eq!(
                (a_now, b_now),
                (vec![1.0, 2.0], vec![10.0, 20.0]),
                "step {k}"
            );
        }
    }
}

/// A chain of states (c <- b <- a <- a + 1, a history of the last values) needs no snapshot:
/// the copies are ordered so that each state is read before it is overwritten.
#[test]
fn chained_states_are_copied_in_dependency_order() {
    let mut g = GraphBuilder::new();
    let c = g.add_input("c", vec![1]);
    let b = g.add_input("b", vec![1]);
    let a = g.add_input("a", vec![1]);
    let one = g.add_const("one", Tensor::f32(vec![1], vec![1.0]));
    let next_a = add(&mut g, Op::Binary(Binary::Add), &[a, one], "a_next");
    g.set_updates(vec![(a, next_a), (b, a), (c, b)]);
    let (plan, exe) = build(&g);
    let text = plan.to_string();
    assert!(!text.contains("before the update"), "{text}");
    let order: Vec<usize> = plan.copies.iter().map(|c| c.to).collect();
    let ids = |n: NodeId| plan.node_buffers[&n];
    assert_eq!(order, [ids(c), ids(b), ids(a)], "{text}");
    for (name, v) in [("a", 2.0), ("b", 1.0), ("c", 0.0)] {
        exe.write(name, &[v]).unwrap();
    }
    for k in 0..3 {
        exe.step(&HashMap::new(), &[]).unwrap();
        let now = |n: &str| exe.read(n).unwrap()[0];
        let a_now = 3.0 + k as f32;
        assert_eq!(
            [now("a"), now("b"), now("c")],
            [a_now, a_now - 1.0, a_now - 2.0]
        );
    }
}

#[test]
fn bad_updates_are_refused_by_the_planner() {
    let mut g = GraphBuilder::new();
    let p = g.add_input("p", vec![4]);
    let c = g.add_const("c", Tensor::f32(vec![3], vec![0.0; 3]));
    let n = add(&mut g, Op::Unary(unary::NEG), &[p], "n");
    g.add_output("n", n);
    g.set_updates(vec![(p, c)]);
    let e = codegen::plan(&g).unwrap_err().to_string();
    assert!(
        e.contains("'p' (4) cannot take the value of 'c' (3)"),
        "{e}"
    );
    g.set_updates(vec![(n, p)]);
    let e = codegen::plan(&g).unwrap_err().to_string();
    assert!(e.contains("'n' is a neg node, not a graph input"), "{e}");
    g.set_updates(vec![(p, n), (p, n)]);
    let e = codegen::plan(&g).unwrap_err().to_string();
    assert!(e.contains("'p' is updated twice"), "{e}");
}

/// A next value that no output depends on still gets computed.
#[test]
fn next_values_are_computed_even_when_no_output_needs_them() {
    let mut g = GraphBuilder::new();
    let counter = g.add_input("step", vec![]);
    let one = g.add_const("one", Tensor::scalar(1.0));
    let next = add(
        &mut g,
        Op::Binary(Binary::Add),
        &[counter, one],
        "step_next",
    );
    g.add_update(counter, next);
    let (plan, exe) = build(&g);
    assert_eq!(plan.kernels.len(), 1, "{plan}");
    exe.write("step", &[0.0]).unwrap();
    for _ in 0..5 {
        assert!(exe.step(&HashMap::new(), &[]).unwrap().is_empty());
    }
    assert_eq!(exe.read("step").unwrap(), [5.0]);
}

// ---------------------------------------------------------------- buffer reuse

/// x [64] -> 12 alternating element-wise ops -> y: every intermediate after the second fits a
/// freed one, so the chain runs in three allocations (input, output, two ping-pong
/// intermediates), and the results are bit-identical to a plan without reuse. Planned unfused:
/// fused, the chain would be one kernel with no intermediates at all.
#[test]
fn buffer_reuse_on_a_chain_keeps_results_exact() {
    let mut g = GraphBuilder::new();
    let x = g.add_input("x", vec![64]);
    let half = g.add_const("half", Tensor::scalar(0.5));
    let mut v = x;
    for i in 0..12 {
        v = match i % 3 {
            0 => add(&mut g, Op::Unary(unary::TANH), &[v], &format!("t{i}")),
            1 => add(
                &mut g,
                Op::Binary(Binary::Mul),
                &[v, half],
                &format!("m{i}"),
            ),
            _ => add(&mut g, Op::Unary(unary::SIGMOID), &[v], &format!("s{i}")),
        };
    }
    // A smaller value late in the chain reuses a larger allocation.
    let sum = add(
        &mut g,
        Op::Reduce {
            kind: Reduce::Sum,
            axes: vec![0],
            keepdims: true,
        },
        &[v],
        "sum",
    );
    let y = add(&mut g, Op::Binary(Binary::Add), &[v, sum], "y");
    g.add_output("y", y);
    let plan = codegen::plan_with(&g, &unfused()).unwrap();
    println!("{plan}");
    let intermediates: Vec<usize> = (0..plan.buffers.len())
        .filter(|&b| plan.buffers[b].role == BufferRole::Intermediate)
        .collect();
    let owners: std::collections::BTreeSet<usize> = intermediates
        .iter()
        .map(|&b| plan.buffers[b].storage)
        .collect();
    assert_eq!(intermediates.len(), 13);
    assert_eq!(owners.len(), 2, "{plan}");
    let sum_buffer = plan.node_buffers[&sum];
    assert_ne!(plan.buffers[sum_buffer].storage, sum_buffer, "{plan}");
    // x (256) + half (4) + two 256-byte intermediates + y (256).
    assert_eq!(plan.peak_bytes(), 256 * 4 + 4, "{plan}");
    assert_eq!(plan.total_bytes(), 256 * 14 + 4 + 4, "{plan}");
    // No kernel writes a buffer that shares memory with one it reads.
    for k in &plan.kernels {
        let out = plan.buffers[k.output].storage;
        assert!(
            k.inputs.iter().all(|&i| plan.buffers[i].storage != out),
            "{} reads and writes one allocation\n{plan}",
            k.name
        );
    }

    let mut no_reuse = plan.clone();
    for (b, spec) in no_reuse.buffers.iter_mut().enumerate() {
        spec.storage = b;
    }
    assert_eq!(no_reuse.peak_bytes(), no_reuse.total_bytes());
    let xs: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 8.0).collect();
    let inputs = HashMap::from([("x".to_string(), xs.clone())]);
    let with = Executable::new(gpu(), &plan, &g)
        .unwrap()
        .run(&inputs)
        .unwrap();
    let without = Executable::new(gpu(), &no_reuse, &g)
        .unwrap()
        .run(&inputs)
        .unwrap();
    assert_eq!(with["y"], without["y"]);
    let want = reference::run(
        &g,
        &HashMap::from([("x".to_string(), Array::from_f32(vec![64], &xs))]),
    )
    .unwrap();
    let got: Vec<f64> = with["y"].iter().map(|&v| v as f64).collect();
    let err = relative_error(&got, &want["y"].data);
    println!("relerr chain {err:.3e}");
    assert!(err <= 1e-5, "{err:e}");
}

/// Buffers a state copy reads keep their own memory: the next value of a state, computed early
/// in the graph, is not overwritten by later kernels before the copy.
#[test]
fn buffers_read_by_state_copies_are_not_reused() {
    let mut g = GraphBuilder::new();
    let p = g.add_input("p", vec![16]);
    let next = add(&mut g, Op::Unary(unary::NEG), &[p], "p_next");
    // A long chain after it, whose intermediates could otherwise take next's memory.
    let mut v = add(&mut g, Op::Unary(unary::EXP), &[next], "e0");
    for i in 1..6 {
        v = add(&mut g, Op::Unary(unary::TANH), &[v], &format!("e{i}"));
    }
    g.add_output("out", v);
    g.add_update(p, next);
    // Unfused (the chain's intermediates exist and reuse memory), then fused (one kernel that
    // writes next beside its output, next keeping a buffer of its own).
    for (fused, options) in [(false, unfused()), (true, PlanOptions::default())] {
        let (plan, exe) = build_with(&g, &options);
        let nb = plan.node_buffers[&next];
        assert!(
            plan.buffers
                .iter()
                .enumerate()
                .all(|(b, s)| b == nb || s.storage != nb),
            "{plan}"
        );
        if fused {
            assert_eq!(plan.kernels.len(), 1, "{plan}");
            assert_eq!(plan.kernels[0].also_writes, [nb], "{plan}");
        } else {
            assert!(plan.peak_bytes() < plan.total_bytes(), "{plan}");
        }
        let p0: Vec<f32> = (0..16).map(|i| i as f32 / 4.0).collect();
        exe.write("p", &p0).unwrap();
        exe.step(&HashMap::new(), &["out"]).unwrap();
        let neg: Vec<f32> = p0.iter().map(|v| -v).collect();
        assert_eq!(exe.read("p").unwrap(), neg);
        exe.step(&HashMap::new(), &[]).unwrap();
        assert_eq!(exe.read("p").unwrap(), p0);
    }
}

/// The bundled 3-D MLP: what reuse saves, and that it still matches the reference.
#[test]
fn mlp3d_peak_versus_total_bytes() {
    let g = common::load("mlp3d");
    let plan = codegen::plan(&g).unwrap();
    let (total, peak) = (plan.total_bytes(), plan.peak_bytes());
    println!("mlp3d: total {total} bytes, peak {peak} bytes allocated");
    assert!(peak < total);
    let text = plan.to_string();
    assert!(text.contains(&format!("total: {total} bytes")), "{text}");
    assert!(text.contains(&format!("allocated: {peak} bytes")), "{text}");
    let inputs = common::read("mlp3d", "inputs.safetensors");
    let got = common::run_gpu(&g, &inputs);
    let want = common::run_reference(&g, &inputs);
    for name in want.keys() {
        let err = common::rel(&got, &want, name);
        println!("relerr mlp3d/{name} {err:.3e}");
        assert!(err <= 1e-5, "{name}: {err:e}");
    }
}

/// Kernels that differ only in names (the same layer shape repeated, as through a transformer)
/// share one compiled pipeline, and each still reads its own buffers: three Linear+Tanh layers of
/// one shape build 3 kernels from 1 pipeline and match the reference.
#[test]
fn repeated_layers_share_pipelines() {
    let mut g = GraphBuilder::new();
    let mut h = g.add_input("x", vec![5, 12]);
    for l in 0..3 {
        let w: Vec<f32> = (0..144)
            .map(|i| ((i * 7 + l * 5) % 13) as f32 / 13.0 - 0.5)
            .collect();
        let w = g.add_const(&format!("w{l}"), Tensor::f32(vec![12, 12], w));
        let y = add(&mut g, Op::MatMul, &[h, w], &format!("mm{l}"));
        h = add(&mut g, Op::Unary(unary::TANH), &[y], &format!("act{l}"));
    }
    g.add_output("y", h);
    let (plan, exe) = build(&g);
    let times = exe.build_times();
    assert_eq!(plan.kernels.len(), 3);
    assert_eq!((times.kernels, times.distinct_pipelines), (3, 1));
    let x: Vec<f32> = (0..60).map(|i| (i % 7) as f32 / 7.0 - 0.4).collect();
    let got = exe.run(&feeds(&[("x", &x)])).unwrap();
    let want = reference::run(
        &g,
        &[("x".to_string(), Array::from_f32(vec![5, 12], &x))].into(),
    )
    .unwrap();
    close(&got["y"], &want["y"].data, "y");
}

/// The plan's buffer lifetimes (what `compile --emit plan` lists): an intermediate lives from its
/// kernel to its last reader, a state's next value until the copy after the kernels, and inputs
/// and constants are written by no kernel.
#[test]
fn plan_lists_buffer_lifetimes() {
    let g = sgd_step();
    let plan = codegen::plan_with(&g, &unfused()).unwrap();
    let lifetimes = plan.lifetimes();
    let index = |name: &str| plan.buffers.iter().position(|b| b.name == name).unwrap();
    let kernel = |name: &str| {
        (plan.kernels.iter())
            .position(|k| k.name.contains(name))
            .unwrap()
    };
    assert_eq!(lifetimes[index("p")], None);
    assert_eq!(lifetimes[index("lr")], None);
    assert_eq!(
        lifetimes[index("lr_g")],
        Some((kernel("lr_g"), kernel("p_next")))
    );
    assert_eq!(
        lifetimes[index("p_next")],
        Some((kernel("p_next"), usize::MAX))
    );
    let listing = plan.to_string();
    assert!(listing.contains("-end"), "{listing}");
}

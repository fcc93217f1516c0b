//! Kernel fusion (`codegen::plan` fuses element-wise chains by default): fused and unfused plans
//! of the same graph must compute the same values, on whole models (mlp3d, with and without a
//! DoRA adapter), on training steps (forward, loss, backward, AdamW update: mlp3d and the tiny
//! GPT-2), and the cases where fusing would be wrong must stay unfused.

mod common;

use common::*;
use dorac::codegen::{self, Kernel, Plan, PlanOptions};
use dorac::ir::{unary, Binary, Graph, GraphBuilder, NodeId, Op};
use dorac::passes::recompute_activations;
use dorac::runtime::Executable;
use dorac::tensor::{relative_error, Array, Rng, Tensor};
use dorac::train::optimizer::step_scalars;
use dorac::train::{build, AdamW, BuildOptions, LossKind, Program, TrainMethod};
use std::collections::{BTreeMap, HashMap};

/// Fused and unfused results agree this closely (relative, max-abs over max-abs): the f32
/// tolerance of every kernel test. The two plans evaluate nearly the same f32 expressions: a
/// backend may contract a fused multiply-add across what used to be a kernel boundary, and a
/// sum of two products (a layer's base and low-rank paths) adds the second's terms to the
/// first's accumulator, scaled as they load, where the unfused plan adds two rounded products:
/// gradients of the first steps differ by up to 1.6e-6 (AdamW's normalised steps carry such
/// differences on).
const TOL: f64 = 1e-5;

fn unfused() -> PlanOptions {
    PlanOptions {
        fuse: false,
        ..PlanOptions::default()
    }
}

fn host(values: &BTreeMap<String, Array>) -> HashMap<String, Vec<f32>> {
    values
        .iter()
        .map(|(k, v)| (k.clone(), v.data.iter().map(|&x| x as f32).collect()))
        .collect()
}

/// Runs `graph` under four plans: fused for any adapter (8 bindings per kernel), fused for this
/// device (as many bindings as it allows: wider kernels, and the device's own kinds of kernel),
/// and each of them unfused. Writes `state` once, then runs `steps` steps on `feeds(t)` (t = 1,
/// 2, ...) fetching every output; compares every output of every step and, at the end, every
/// state, of each fused plan with its unfused twin. Returns (fused kernels, unfused kernels) of
/// the portable plan.
fn compare(
    tag: &str,
    graph: &Graph,
    state: &BTreeMap<String, Array>,
    steps: usize,
    feeds: impl Fn(usize) -> BTreeMap<String, Array>,
) -> (usize, usize) {
    let fused = codegen::plan(graph).unwrap();
    let device = gpu().plan_options();
    let wide = codegen::plan_with(graph, &device).unwrap();
    let plain = codegen::plan_with(graph, &unfused()).unwrap();
    // The device plan's unfused twin: the same kernels for each op (the device's target and
    // subgroup size choose them, and with them the order a sum adds its terms in).
    let plain_device = codegen::plan_with(
        graph,
        &PlanOptions {
            fuse: false,
            ..device.clone()
        },
    )
    .unwrap();
    assert!(
        plain.kernels.iter().all(|k| k.nodes.len() == 1),
        "{tag}: fuse: false still fused"
    );
    check_bindings(tag, &fused, 8);
    check_bindings(tag, &wide, device.max_bindings);
    assert!(
        wide.kernels.len() <= fused.kernels.len(),
        "{tag}: more bindings, more kernels"
    );
    let exes: Vec<Executable> = [&fused, &wide, &plain, &plain_device]
        .iter()
        .map(|p| Executable::new(gpu(), p, graph).unwrap())
        .collect();
    for exe in &exes {
        for (name, v) in host(state) {
            exe.write(&name, &v).unwrap();
        }
    }
    let outputs: Vec<&str> = graph.outputs().iter().map(|(n, _)| n.as_str()).collect();
    let mut worst = 0.0f64;
    let mut check = |what: String, a: &[f32], b: &[f32]| {
        let a: Vec<f64> = a.iter().map(|&x| x as f64).collect();
        let b: Vec<f64> = b.iter().map(|&x| x as f64).collect();
        let err = relative_error(&a, &b);
        assert!(
            err <= TOL,
            "{tag}: {what}: fused vs unfused relative error {err:e}"
        );
        worst = worst.max(err);
    };
    for t in 1..=steps {
        let inputs = host(&feeds(t));
        let got: Vec<HashMap<String, Vec<f32>>> = exes
            .iter()
            .map(|e| e.step(&inputs, &outputs).unwrap())
            .collect();
        for (plan, got_fused, got_plain) in
            [("portable", &got[0], &got[2]), ("device", &got[1], &got[3])]
        {
            for name in &outputs {
                check(
                    format!("{plan} plan, step {t} output '{name}'"),
                    &got_fused[*name],
                    &got_plain[*name],
                );
            }
        }
    }
    for name in state.keys() {
        for (plan, exe, plain) in [
            ("portable", &exes[0], &exes[2]),
            ("device", &exes[1], &exes[3]),
        ] {
            let what = format!("{plan} plan, state '{name}' after {steps} steps");
            check(what, &exe.read(name).unwrap(), &plain.read(name).unwrap());
        }
    }
    let counts = (fused.kernels.len(), plain.kernels.len());
    println!(
        "{tag}: {} kernels fused ({} with {} bindings), {} unfused; worst relative difference \
         {worst:.2e}",
        counts.0,
        wide.kernels.len(),
        device.max_bindings,
        counts.1
    );
    counts
}

/// Every fused kernel stays within the bindings the plan was made for.
fn check_bindings(tag: &str, plan: &Plan, max: usize) {
    for k in &plan.kernels {
        let n = k.bindings().count();
        assert!(n <= max, "{tag}: {} binds {n} buffers, over {max}", k.name);
    }
}

fn with_adapter(name: &str, adapter: &str) -> Graph {
    let mut g = load(name);
    let a = dorac::adapter::load(&models_dir().join(name).join(adapter)).unwrap();
    dorac::adapter::apply(&mut g, &a).unwrap();
    g
}

/// Random feeds of the given names and shapes.
fn random_feeds<const N: usize>(
    shapes: [(&str, Vec<usize>); N],
    rng: &mut Rng,
) -> BTreeMap<String, Array> {
    (shapes.into_iter())
        .map(|(name, shape)| (name.to_string(), random(&shape, rng)))
        .collect()
}

/// The plan for this machine's device (the CPU templates on lavapipe) and the portable one
/// (the 16 x 16 and blocked templates, 8 bindings a kernel).
fn device_and_portable_plans(graph: &Graph) -> [Plan; 2] {
    [
        codegen::plan_with(graph, &gpu().plan_options()).unwrap(),
        codegen::plan(graph).unwrap(),
    ]
}

fn random(shape: &[usize], rng: &mut Rng) -> Array {
    let n = shape.iter().product();
    Array::new(shape.to_vec(), (0..n).map(|_| rng.normal()).collect())
}

#[test]
fn mlp3d_fused_matches_unfused() {
    let g = load("mlp3d");
    let inputs = read("mlp3d", "inputs.safetensors");
    let (fused, plain) = compare("mlp3d", &g, &BTreeMap::new(), 1, |_| inputs.clone());
    assert!(fused < plain, "mlp3d: nothing fused ({fused} kernels)");
    // And both match the reference executor.
    let want = run_reference(&g, &inputs);
    let got = run_gpu(&g, &inputs);
    assert!(rel(&got, &want, "y") < 1e-5);
}

#[test]
fn dora_adapted_mlp3d_fused_matches_unfused() {
    // Unfolded: the factored norm, the low-rank path and the magnitude scale all run on the
    // device, as in training.
    let g = with_adapter("mlp3d", "peft_dora");
    let inputs = read("mlp3d", "inputs.safetensors");
    let (fused, plain) = compare("mlp3d + DoRA", &g, &BTreeMap::new(), 1, |_| inputs.clone());
    assert!(
        fused < plain,
        "mlp3d + DoRA: nothing fused ({fused} kernels)"
    );
    let peft = read("mlp3d", "peft_dora_outputs.safetensors");
    let got = run_gpu(&g, &inputs);
    assert!(rel(&got, &peft, "y") < 1e-5);
}

/// The state a session starts from: parameters at their initial values, moments at zero.
fn initial_state(program: &Program) -> BTreeMap<String, Array> {
    let mut state = BTreeMap::new();
    for p in &program.params {
        state.insert(p.name.clone(), p.initial.to_array());
        let zeros = Array::zeros(p.initial.shape.clone());
        state.insert(p.exp_avg.clone(), zeros.clone());
        state.insert(p.exp_avg_sq.clone(), zeros);
    }
    state
}

/// A batch plus the optimizer's per-step scalars for step `t`.
fn step_feeds(
    batch: &BTreeMap<String, Array>,
    optimizer: &AdamW,
    t: usize,
) -> BTreeMap<String, Array> {
    let mut feeds = batch.clone();
    for (k, v) in step_scalars(optimizer, optimizer.lr, t) {
        feeds.insert(k.into(), Array::new(vec![], vec![v as f32 as f64]));
    }
    feeds
}

/// Three DoRA (detached, exact norm with clipping, and with lean activations) and LoRA steps of
/// `graph` on `batch`, fused and unfused. Returns the device plans of the DoRA steps.
fn training_steps_fused_match_unfused(
    model: &str,
    graph: impl Fn(&str) -> Graph,
    batch: &BTreeMap<String, Array>,
) -> Vec<Plan> {
    let mut device_plans = vec![];
    for (method, exact, clip, lean) in [
        (TrainMethod::Dora, false, None, false),
        (TrainMethod::Dora, true, Some(0.5), false),
        (TrainMethod::Lora, false, None, false),
        (TrainMethod::Dora, false, None, true),
    ] {
        let adapter = if method == TrainMethod::Lora {
            "peft_lora"
        } else {
            "peft_dora"
        };
        let optimizer = AdamW {
            lr: 1e-2,
            grad_clip: clip,
            ..AdamW::default()
        };
        let opts = BuildOptions {
            method,
            loss: LossKind::Mse,
            output: None,
            labels: "target".into(),
            optimizer: optimizer.clone(),
            exact_norm_grad: exact,
            expose_grads: true,
            full_targets: None,
            lean_activations: lean,
        };
        let program = build(graph(adapter), &opts).unwrap();
        let tag = format!(
            "{model} {} step (exact norm {exact}, lean activations {lean})",
            method.name()
        );
        let state = initial_state(&program);
        let (fused, plain) = compare(&tag, &program.graph, &state, 3, |t| {
            step_feeds(batch, &optimizer, t)
        });
        assert!(fused < plain, "{tag}: nothing fused");
        // The device plan's first step (loss and every gradient) against the f64 reference.
        let plan = codegen::plan_with(&program.graph, &gpu().plan_options()).unwrap();
        let exe = Executable::new(gpu(), &plan, &program.graph).unwrap();
        for (name, v) in host(&state) {
            exe.write(&name, &v).unwrap();
        }
        let mut feeds = step_feeds(batch, &optimizer, 1);
        let outputs: Vec<&str> = (program.graph.outputs().iter())
            .map(|(n, _)| n.as_str())
            .collect();
        let got = exe.step(&host(&feeds), &outputs).unwrap();
        feeds.extend(state.clone());
        let want = run_reference(&program.graph, &feeds);
        for name in &outputs {
            let got: Vec<f64> = got[*name].iter().map(|&v| v as f64).collect();
            let err = relative_error(&got, &want[*name].data);
            assert!(err < 1e-5, "{tag}: '{name}' against the reference: {err:e}");
        }
        if method == TrainMethod::Dora {
            device_plans.push(plan);
        }
    }
    device_plans
}

#[test]
fn dora_training_steps_fused_match_unfused() {
    let mut rng = Rng::new(11);
    let x = read("mlp3d", "inputs.safetensors")["x"].clone();
    let batch: BTreeMap<String, Array> = [
        ("x".to_string(), x),
        ("target".to_string(), random(&[2, 5, 8], &mut rng)),
    ]
    .into();
    let plans = training_steps_fused_match_unfused("mlp3d", |a| with_adapter("mlp3d", a), &batch);
    assert_magnitude_sums_per_tile(&plans, 2);
}

/// Each DoRA plan computes at least `nodes` nodes of its activations again in kernels of the
/// backward pass (from the first kernel that writes a gradient on), inside kernels that compute
/// gradients or update parameters too (so no kernel of their own), from the layers' `u`; where
/// such a kernel writes a copy for a product, the forward pass's copy is freed before it.
fn assert_activations_recomputed(plans: &[Plan], nodes: usize) {
    for plan in plans {
        let spans = plan.lifetimes();
        let writes = |k: &Kernel, prefix: &str| {
            k.written()
                .any(|w| plan.buffers[w].name.starts_with(prefix))
        };
        let first_backward = (plan.kernels.iter())
            .position(|k| writes(k, "grad/"))
            .expect("a backward pass");
        let copies = plan.kernels[first_backward..]
            .iter()
            .filter(|k| writes(k, "grad/") || writes(k, "optim/"))
            .flat_map(|k| &k.labels)
            .filter(|l| l.ends_with("/recomputed"))
            .count();
        assert!(copies >= nodes, "{copies} nodes recomputed:\n{plan}");
        for (k, kernel) in plan.kernels.iter().enumerate().skip(first_backward) {
            for b in kernel.written() {
                let Some(original) = plan.buffers[b].name.strip_suffix("/recomputed") else {
                    continue;
                };
                let o = (0..plan.buffers.len()).find(|&o| plan.buffers[o].name == original);
                assert!(
                    o.is_none_or(|o| spans[o].expect("computed").1 < k),
                    "'{original}' is still live where it is recomputed:\n{plan}"
                );
            }
        }
    }
}

/// On a CPU target, each DoRA plan sums at least `layers` magnitude gradients per tile of rows.
fn assert_magnitude_sums_per_tile(plans: &[Plan], layers: usize) {
    if gpu().plan_options().target == codegen::Target::Cpu {
        for plan in plans {
            let sums = (plan.buffers.iter())
                .filter(|b| b.name.ends_with("/tile_sums"))
                .count();
            assert!(
                sums >= layers,
                "{sums} magnitude gradients summed per tile:\n{plan}"
            );
        }
    }
}

/// The same on a 2-D MLP at a batch of 37 rows: on a CPU target each layer's magnitude
/// gradient is summed per tile of 16 rows by the product computing its `dY` (the last tile
/// partial), and the layers' sums of those take one dispatch where the device binds arrays.
#[test]
fn dora_training_steps_with_column_sums_fused_match_unfused() {
    let mut rng = Rng::new(12);
    let x = random(&[37, 16], &mut rng);
    let shapes: BTreeMap<String, Array> = [("x".to_string(), x.clone())].into();
    let graph = |adapter: &str| {
        let mut g = load_path(&models_dir().join("mlp2d/model.onnx"), &shapes);
        let a = dorac::adapter::load(&models_dir().join("mlp2d").join(adapter)).unwrap();
        dorac::adapter::apply(&mut g, &a).unwrap();
        g
    };
    let outputs = graph("peft_dora").outputs()[0].1;
    let out_shape = graph("peft_dora").shape(outputs).to_vec();
    let batch: BTreeMap<String, Array> = [
        ("x".to_string(), x),
        ("target".to_string(), random(&out_shape, &mut rng)),
    ]
    .into();
    let plans = training_steps_fused_match_unfused("mlp2d", graph, &batch);
    assert_magnitude_sums_per_tile(&plans, 2);
    // The head's input `tanh(out)`, from `out`, which Tanh's gradient keeps anyway.
    assert_activations_recomputed(&plans, 1);
}

#[test]
fn gpt2_tiny_training_step_fused_matches_unfused() {
    let dir = models_dir().join("gpt2_tiny");
    let data = dorac::tensors_io::read_safetensors(&dir.join("train/data.safetensors")).unwrap();
    let proto = dorac::onnx::load_model(&dir.join("legacy_op17.onnx")).unwrap();
    let shapes: HashMap<String, Vec<usize>> =
        [("input_ids".to_string(), data["input_ids"].shape.clone())].into();
    let mut g =
        dorac::onnx::import(&proto, &dir, &dorac::onnx::ShapePins::default(), &shapes).unwrap();
    let adapter = dorac::adapter::load(&dir.join("peft_dora")).unwrap();
    dorac::adapter::apply(&mut g, &adapter).unwrap();
    let optimizer = AdamW {
        lr: 1e-2,
        ..AdamW::default()
    };
    let opts = BuildOptions {
        method: TrainMethod::Dora,
        loss: LossKind::Lm { ignore_index: -100 },
        output: None,
        labels: "labels".into(),
        optimizer: optimizer.clone(),
        exact_norm_grad: false,
        expose_grads: true,
        full_targets: None,
        lean_activations: false,
    };
    let program = build(g, &opts).unwrap();
    // On a CPU target, the one layer whose `dY` a product computes (through a reshape) has its
    // magnitude gradient summed per tile there.
    let device_plan = [codegen::plan_with(&program.graph, &gpu().plan_options()).unwrap()];
    assert_magnitude_sums_per_tile(&device_plan, 1);
    let state = initial_state(&program);
    let (fused, plain) = compare("gpt2_tiny DoRA lm step", &program.graph, &state, 2, |t| {
        step_feeds(&data, &optimizer, t)
    });
    assert!(
        fused * 10 < plain * 7,
        "gpt2_tiny: {fused} fused kernels of {plain}: less than 30% fewer"
    );
}

// ---------------------------------------------------------------- where fusion must not happen

/// x @ w + bias -> relu -> * 2 -> output "y", with `mid` (the add) exposed in the ways that
/// must stop the chain at it.
fn chain() -> (GraphBuilder, [NodeId; 4]) {
    let mut rng = Rng::new(3);
    let mut t = |shape: Vec<usize>| {
        let v = (0..shape.iter().product())
            .map(|_| rng.range(-1.0, 1.0) as f32)
            .collect();
        Tensor::f32(shape, v)
    };
    let mut g = GraphBuilder::new();
    let x = g.add_input("x", vec![6, 10]);
    let w = g.add_const("w", t(vec![10, 12]));
    let bias = g.add_const("bias", t(vec![12]));
    let two = g.add_const("two", Tensor::scalar(2.0));
    let mm = g.add(Op::MatMul, &[x, w], "mm", "mm").unwrap();
    let add = g.add(Op::Binary(Binary::Add), &[mm, bias], "mid", "add");
    let add = add.unwrap();
    let relu = g
        .add(Op::Unary(unary::RELU), &[add], "relu", "relu")
        .unwrap();
    let y = g
        .add(Op::Binary(Binary::Mul), &[relu, two], "y", "mul")
        .unwrap();
    g.add_output("y", y);
    (g, [mm, add, relu, y])
}

fn groups(plan: &Plan) -> Vec<Vec<NodeId>> {
    plan.kernels.iter().map(|k| k.nodes.clone()).collect()
}

fn x_feed() -> BTreeMap<String, Array> {
    [("x".to_string(), random(&[6, 10], &mut Rng::new(9)))].into()
}

#[test]
fn a_whole_chain_fuses_into_one_kernel() {
    let (g, n) = chain();
    let plan = codegen::plan(&g).unwrap();
    assert_eq!(groups(&plan), vec![n.to_vec()], "{plan}");
    compare("chain", &g, &BTreeMap::new(), 1, |_| x_feed());
    let (got, want) = (run_gpu(&g, &x_feed()), run_reference(&g, &x_feed()));
    assert!(rel(&got, &want, "y") < 1e-5);
}

#[test]
fn a_value_with_a_later_second_reader_is_written_and_the_chain_goes_on() {
    // The second reader adds a tensor of twice the elements: it cannot join the kernel.
    let (mut g, [mm, add, relu, y]) = chain();
    let wide = g.add_input("wide", vec![2, 6, 12]);
    let plus = g.add(Op::Binary(Binary::Add), &[add, wide], "plus", "plus");
    let plus = plus.unwrap();
    g.add_output("plus", plus);
    let plan = codegen::plan(&g).unwrap();
    assert_eq!(
        groups(&plan),
        vec![vec![mm, add, relu, y], vec![plus]],
        "{plan}"
    );
    // The first kernel writes the add's value beside its output; the second reads it.
    assert_eq!(
        plan.kernels[0].also_writes,
        [plan.node_buffers[&add]],
        "{plan}"
    );
    assert!(
        plan.kernels[1].inputs.contains(&plan.node_buffers[&add]),
        "{plan}"
    );
    let feeds = || {
        let mut f = x_feed();
        f.insert("wide".into(), random(&[2, 6, 12], &mut Rng::new(4)));
        f
    };
    compare("two consumers", &g, &BTreeMap::new(), 1, |_| feeds());
    // Both the chain's value and the one read back from memory, against the f64 reference.
    let (got, want) = (run_gpu(&g, &feeds()), run_reference(&g, &feeds()));
    assert!(rel(&got, &want, "y") < 1e-5);
    assert!(rel(&got, &want, "plus") < 1e-5);
}

#[test]
fn a_later_second_reader_of_the_same_count_joins_as_a_late_epilogue() {
    // `neg` reads the add's value, but the chain goes on through `relu`, scheduled first:
    // `neg` joins the kernel's end, which writes `y` beside it.
    let (mut g, [mm, add, relu, y]) = chain();
    let neg = g.add(Op::Unary(unary::NEG), &[add], "neg", "neg").unwrap();
    g.add_output("neg", neg);
    let plan = codegen::plan(&g).unwrap();
    assert_eq!(groups(&plan), vec![vec![mm, add, relu, y, neg]], "{plan}");
    assert_eq!(
        plan.kernels[0].also_writes,
        [plan.node_buffers[&y]],
        "{plan}"
    );
    compare("late epilogue", &g, &BTreeMap::new(), 1, |_| x_feed());
    let (got, want) = (run_gpu(&g, &x_feed()), run_reference(&g, &x_feed()));
    assert!(rel(&got, &want, "y") < 1e-5);
    assert!(rel(&got, &want, "neg") < 1e-5);
}

#[test]
fn a_graph_output_in_the_middle_is_written_beside_the_chain() {
    let (mut g, [mm, add, relu, y]) = chain();
    g.add_output("mid", add);
    let plan = codegen::plan(&g).unwrap();
    assert_eq!(groups(&plan), vec![vec![mm, add, relu, y]], "{plan}");
    // The output in the middle has its own buffer, written by the kernel, and is read back.
    let out = plan.outputs.iter().find(|(n, _)| n == "mid").unwrap().1;
    assert_eq!(plan.node_buffers[&add], out);
    assert_eq!(plan.kernels[0].also_writes, [out], "{plan}");
    compare("output in the middle", &g, &BTreeMap::new(), 1, |_| {
        x_feed()
    });
    let (got, want) = (run_gpu(&g, &x_feed()), run_reference(&g, &x_feed()));
    assert!(rel(&got, &want, "mid") < 1e-5);
}

#[test]
fn a_state_update_value_is_written_beside_the_chain() {
    // A state s [6, 12] takes the add's value after every step; the add also feeds the chain.
    let (mut g, [mm, add, relu, y]) = chain();
    let s = g.add_input("s", vec![6, 12]);
    let plus = g
        .add(Op::Binary(Binary::Add), &[y, s], "out", "plus")
        .unwrap();
    g.set_outputs(vec![("out".into(), plus)]);
    g.add_update(s, add);
    let plan = codegen::plan(&g).unwrap();
    // s is a graph input, ready before the kernel: the final add joins the chain too, and the
    // state's next value is written beside the output.
    assert_eq!(groups(&plan), vec![vec![mm, add, relu, y, plus]], "{plan}");
    assert_eq!(plan.states[0].next, plan.node_buffers[&add], "{plan}");
    assert_eq!(
        plan.kernels[0].also_writes,
        [plan.node_buffers[&add]],
        "{plan}"
    );
    let state: BTreeMap<String, Array> = [("s".to_string(), Array::zeros(vec![6, 12]))].into();
    compare("state update in the middle", &g, &state, 3, |_| x_feed());
}

#[test]
fn an_input_computed_after_the_anchor_joins_as_a_side_operand() {
    // y = relu(x @ w + bias) * 2 * late, where `late` (exp of another input) is scheduled after
    // the matmul and read by the last Mul alone: it is computed inside the matmul's kernel, so
    // the whole expression is one kernel, with the same values as unfused.
    let (mut g, [mm, add, relu, y]) = chain();
    let z = g.add_input("z", vec![6, 12]);
    let late = g.add(Op::Unary(unary::EXP), &[z], "late", "late").unwrap();
    let prod = g
        .add(Op::Binary(Binary::Mul), &[y, late], "prod", "prod")
        .unwrap();
    g.set_outputs(vec![("prod".into(), prod)]);
    let plan = codegen::plan(&g).unwrap();
    assert_eq!(
        groups(&plan),
        vec![vec![mm, add, relu, y, late, prod]],
        "{plan}"
    );
    let feeds = |_| {
        let mut f = x_feed();
        f.insert("z".into(), random(&[6, 12], &mut Rng::new(4)));
        f
    };
    compare("late input", &g, &BTreeMap::new(), 1, feeds);
}

/// A Cast to float32 is a view (every value is f32 on the device): between two element-wise
/// ops of the same shape it passes the value on in registers, so the chain goes through it. A
/// Reshape keeps the flat order too, so the chain goes on through it to a reader of another
/// shape with as many elements (the epilogue runs at the same flat index).
#[test]
fn a_view_passes_a_chain_on() {
    let mut g = GraphBuilder::new();
    let x = g.add_input("x", vec![6, 10]);
    let zero = g.add_const("zero", Tensor::scalar(0.0));
    let pos = g
        .add(Op::Binary(Binary::Less), &[zero, x], "pos", "pos")
        .unwrap();
    let not = g.add(Op::Unary(unary::NOT), &[pos], "not", "not").unwrap();
    let cast = g
        .add(
            Op::Cast {
                to: dorac::tensor::DType::F32,
            },
            &[not],
            "mask",
            "mask",
        )
        .unwrap();
    let y = g
        .add(Op::Binary(Binary::Mul), &[cast, x], "y", "y")
        .unwrap();
    let flat = g
        .add(Op::Reshape { shape: vec![60] }, &[y], "flat", "flat")
        .unwrap();
    let z = g.add(Op::Unary(unary::EXP), &[flat], "z", "z").unwrap();
    g.add_output("z", z);
    let plan = codegen::plan(&g).unwrap();
    assert_eq!(
        groups(&plan),
        vec![vec![pos, not, cast, y, flat, z]],
        "{plan}"
    );
    let (got, want) = (run_gpu(&g, &x_feed()), run_reference(&g, &x_feed()));
    assert!(rel(&got, &want, "z") < 1e-5);
}

/// A value that a kernel reads through a chain of two views of another kernel's interior value
/// (as Swin's attention gradient reads a transpose reshaped twice): that value is written, and
/// both views name its buffer.
#[test]
fn a_value_read_outside_through_two_views_is_written() {
    let mut g = GraphBuilder::new();
    let x = g.add_input("x", vec![6, 10]);
    let neg = g.add(Op::Unary(unary::NEG), &[x], "neg", "neg").unwrap();
    let flat = g.add(Op::Reshape { shape: vec![60] }, &[neg], "flat", "flat");
    let flat = flat.unwrap();
    let rows = g.add(Op::Reshape { shape: vec![3, 20] }, &[flat], "rows", "rows");
    let rows = rows.unwrap();
    let z = g.add(Op::Unary(unary::EXP), &[rows], "z", "z").unwrap();
    let sum = Op::Reduce {
        kind: dorac::ir::Reduce::Sum,
        axes: vec![1],
        keepdims: false,
    };
    let s = g.add(sum, &[rows], "s", "s").unwrap();
    g.add_output("z", z);
    g.add_output("s", s);
    let plan = codegen::plan(&g).unwrap();
    let reader = plan.kernels.iter().find(|k| k.nodes.contains(&s)).unwrap();
    assert!(!reader.nodes.contains(&neg), "{plan}");
    assert_eq!(plan.node_buffers[&rows], plan.node_buffers[&neg], "{plan}");
    let (got, want) = (run_gpu(&g, &x_feed()), run_reference(&g, &x_feed()));
    assert!(rel(&got, &want, "z") < 1e-5);
    assert!(rel(&got, &want, "s") < 1e-5);
}

/// The gradients of strided slices on the device, against the reference: Swin's patch merging
/// (the four interleaved quarters of an image, `x[:, i::2, j::2]`, joined along features) and
/// GPT-J's rotary pairs (`x[..., ::2]` and `x[..., 1::2]`), then a product, and `torch.flip`'s
/// reversal.
#[test]
fn strided_slice_gradients_on_the_device_match_the_reference() {
    let mut g = GraphBuilder::new();
    let x = g.add_input("x", vec![2, 4, 6, 3]);
    let slice = |g: &mut GraphBuilder, x: NodeId, starts: [i64; 4], ends: [i64; 4], steps| {
        let op = Op::Slice {
            starts: starts.to_vec(),
            ends: ends.to_vec(),
            steps: Vec::from(steps),
        };
        let name = format!("s{starts:?}{steps:?}");
        g.add(op, &[x], &name, &name).unwrap()
    };
    let quarters: Vec<NodeId> = [(0, 0), (1, 0), (0, 1), (1, 1)]
        .iter()
        .map(|&(i, j)| slice(&mut g, x, [0, i, j, 0], [2, 4, 6, 3], [1, 2, 2, 1]))
        .collect();
    let merged = g.add(Op::Concat { axis: 3 }, &quarters, "merged", "merged");
    let merged = merged.unwrap();
    let even = slice(&mut g, merged, [0, 0, 0, 0], [2, 2, 3, 12], [1, 1, 1, 2]);
    let odd = slice(&mut g, merged, [0, 0, 0, 1], [2, 2, 3, 12], [1, 1, 1, 2]);
    let flipped = slice(&mut g, odd, [1, 0, 2, 0], [-1, 2, -1, 6], [-1, 1, -1, 1]);
    let pairs = g.add(Op::Binary(Binary::Mul), &[even, flipped], "pairs", "pairs");
    let pairs = pairs.unwrap();
    let w = g.add_input("w", vec![6, 5]);
    let y = g.add(Op::MatMul, &[pairs, w], "y", "y").unwrap();
    let r = random(&[2, 2, 3, 5], &mut Rng::new(5));
    let r = Tensor::f32(r.shape.clone(), r.data.iter().map(|&v| v as f32).collect());
    let r = g.add_const("r", r);
    let weighted = g.add(Op::Binary(Binary::Mul), &[y, r], "weighted", "weighted");
    let sum = Op::Reduce {
        kind: dorac::ir::Reduce::Sum,
        axes: vec![0, 1, 2, 3],
        keepdims: false,
    };
    let loss = g.add(sum, &[weighted.unwrap()], "loss", "loss").unwrap();
    g.add_output("loss", loss);
    let mut g = g.finish();
    let grads = dorac::passes::autodiff::differentiate(&mut g, loss, &[x, w]).unwrap();
    let mut g = GraphBuilder::extending(g);
    g.add_output("dx", grads[0]);
    g.add_output("dw", grads[1]);
    let g = g.finish();
    let feeds: BTreeMap<String, Array> = [
        ("x".to_string(), random(&[2, 4, 6, 3], &mut Rng::new(6))),
        ("w".to_string(), random(&[6, 5], &mut Rng::new(7))),
    ]
    .into();
    let (got, want) = (run_gpu(&g, &feeds), run_reference(&g, &feeds));
    for key in ["loss", "dx", "dw"] {
        assert!(
            rel(&got, &want, key) < TOL,
            "{key}: {}",
            rel(&got, &want, key)
        );
    }
}

/// The graph of the column-sum tests: `mm = x @ w` (m x k @ k x n), `y = relu(mm)`, and sums
/// over rows of `y * u` (kept dims), `mm - y` (two values of the product's kernel), and of
/// `mm2 * mm` for a second product `mm2` (an output too, so that its term is left to the sum
/// as it loads), of the same op as the first: (graph, [mm, mm2, the three terms, s2]).
fn column_sums_graph(rows: &[usize], k: usize, n: usize) -> (Graph, [NodeId; 6]) {
    let dims = |last: usize| [rows, &[last]].concat();
    let mut g = GraphBuilder::new();
    let x = g.add_input("x", dims(k));
    let w = g.add_input("w", vec![k, n]);
    let u = g.add_input("u", dims(n));
    let mm = g.add(Op::MatMul, &[x, w], "mm", "mm").unwrap();
    let relu = g.add(Op::Unary(unary::RELU), &[mm], "y", "relu").unwrap();
    let sum = |g: &mut GraphBuilder, t: NodeId, name: &str| {
        let op = Op::Reduce {
            kind: dorac::ir::Reduce::Sum,
            axes: (0..rows.len()).collect(),
            keepdims: name.starts_with("s_kept"),
        };
        g.add(op, &[t], name, name).unwrap()
    };
    let mul = |g: &mut GraphBuilder, a: NodeId, b: NodeId, name: &str| {
        g.add(Op::Binary(Binary::Mul), &[a, b], name, name).unwrap()
    };
    let by_u = mul(&mut g, relu, u, "by_u");
    let s = sum(&mut g, by_u, "s_kept");
    let both = g
        .add(Op::Binary(Binary::Sub), &[mm, relu], "both", "both")
        .unwrap();
    let t = sum(&mut g, both, "t");
    let w2 = g.add_input("w2", vec![k, n]);
    let mm2 = g.add(Op::MatMul, &[x, w2], "mm2", "mm2").unwrap();
    let by_mm = mul(&mut g, mm2, mm, "by_mm");
    let s2 = sum(&mut g, by_mm, "s_kept2");
    let half = g.add_const("half", Tensor::scalar(0.5));
    let s2 = mul(&mut g, s2, half, "s2");
    g.add_output("y", relu);
    g.add_output("s_kept", s);
    g.add_output("t", t);
    g.add_output("s2", s2);
    g.add_output("z", mm2);
    (g.finish(), [mm, mm2, by_u, both, by_mm, s2])
}

/// Options of a CPU driver with subgroups of 8 lanes, 48 bindings and binding arrays (lavapipe),
/// for kernels pinned by snapshots whatever the machine running the tests.
fn lavapipe_like() -> PlanOptions {
    PlanOptions {
        target: codegen::Target::Cpu,
        subgroup_size: Some(8),
        max_bindings: 48,
        binding_arrays: true,
        ..PlanOptions::default()
    }
}

/// Checks the column sums of [`column_sums_graph`] in `plan`, which has `rows` rows of sums per
/// term (0: none): every term is computed by a product's kernel (the first product's its own
/// two, `by_mm` by either, loading the other's value), each sum reads its rows of sums alone,
/// and the two sums of the same op are one dispatch where the plan binds arrays. Then runs the
/// plan against the f64 reference.
fn check_column_sums(graph: &Graph, nodes: [NodeId; 6], plan: &Plan, rows: usize, arrays: bool) {
    let [mm, mm2, by_u, both, by_mm, _] = nodes;
    let shape = graph.shape(mm).to_vec();
    let n = *shape.last().unwrap();
    let sums: Vec<&codegen::BufferSpec> = (plan.buffers.iter())
        .filter(|b| b.name.ends_with("/tile_sums"))
        .collect();
    if rows == 0 {
        assert!(sums.is_empty(), "{plan}");
    } else {
        assert_eq!(sums.len(), 3, "{plan}");
        assert!(sums.iter().all(|b| b.shape == [rows, n]), "{plan}");
        for term in [by_u, both, by_mm] {
            let kernel = (plan.kernels.iter()).find(|k| k.nodes.contains(&term));
            assert!([mm, mm2].contains(&kernel.unwrap().nodes[0]), "{plan}");
        }
        let first = plan.kernels.iter().find(|k| k.nodes[0] == mm).unwrap();
        assert!(first.nodes.contains(&by_u) && first.nodes.contains(&both));
        assert_eq!(plan.kernels.len(), if arrays { 4 } else { 5 }, "{plan}");
    }
    let x_shape = graph.shape(graph.inputs_of(mm)[0]).to_vec();
    let k = *x_shape.last().unwrap();
    let mut rng = Rng::new(21);
    let shapes = [
        ("x", x_shape),
        ("w", vec![k, n]),
        ("u", shape.clone()),
        ("w2", vec![k, n]),
    ];
    let feeds: BTreeMap<String, Array> = shapes
        .into_iter()
        .map(|(name, shape)| (name.to_string(), random(&shape, &mut rng)))
        .collect();
    compare("column sums", graph, &BTreeMap::new(), 1, |_| feeds.clone());
    let exe = Executable::new(gpu(), plan, graph).unwrap();
    let outputs = ["y", "s_kept", "t", "s2", "z"];
    let got = exe.step(&host(&feeds), &outputs).unwrap();
    let want = run_reference(graph, &feeds);
    for name in outputs {
        let got: Vec<f64> = got[name].iter().map(|&v| v as f64).collect();
        let err = relative_error(&got, &want[name].data);
        assert!(err < 1e-5, "{shape:?}, {name}: relative error {err:e}");
    }
}

/// A sum over the rows of a product's output whose terms read the product's values (DoRA's
/// magnitude gradient `sum(dY * u)` where a product computes `dY`): the product's kernel adds
/// each column's terms over its rows and writes a row of sums per tile of rows (the CPU
/// template) or per row of invocations (the blocked one), and the sum adds those. 37 x 50 (on
/// the CPU template three tiles of 16, the last partial, and columns not a multiple of 4; on
/// the portable plan, the 16 x 16 template, which sums nothing), 70 x 80 (two 64 x 64 blocked
/// tiles of 16 rows of invocations), 2 x 21 x 50 (a batch of two matrices, summed over both
/// leading axes: two tiles each) and 2 x 70 x 80 (the same on the blocked template). The values
/// match the f64 reference and the unfused plans.
#[test]
fn a_sum_over_rows_of_a_products_terms_is_summed_per_tile_by_the_product() {
    let device = gpu().plan_options();
    let cpu = device.target == codegen::Target::Cpu;
    let cases = [
        (&[37][..], 50, 0),
        (&[70], 80, 32),
        (&[2, 21], 50, 0),
        (&[2, 70], 80, 64),
    ];
    for (lead, n, portable_rows) in cases {
        let (g, nodes) = column_sums_graph(lead, 24, n);
        let plan = codegen::plan_with(&g, &device).unwrap();
        let m = lead.last().unwrap();
        let rows = if cpu {
            lead[..lead.len() - 1].iter().product::<usize>() * m.div_ceil(16)
        } else {
            portable_rows
        };
        check_column_sums(&g, nodes, &plan, rows, device.binding_arrays);
        let portable = codegen::plan(&g).unwrap();
        check_column_sums(&g, nodes, &portable, portable_rows, false);
    }
    // The first product's kernel and the batched sums for a CPU driver with subgroups of 8
    // lanes, and the first product's blocked kernel, pinned for review.
    let cpu = lavapipe_like();
    let (g, [mm, _, _, _, _, s2]) = column_sums_graph(&[37], 24, 50);
    let pinned = codegen::plan_with(&g, &cpu).unwrap();
    let kernel = |plan: &Plan, n: NodeId| {
        let k = plan.kernels.iter().find(|k| k.nodes.contains(&n));
        k.unwrap().source.clone()
    };
    insta::assert_snapshot!("column_sums_product", kernel(&pinned, mm));
    insta::assert_snapshot!("column_sums_batched", kernel(&pinned, s2));
    let (g, [mm, ..]) = column_sums_graph(&[70], 24, 80);
    let portable = codegen::plan(&g).unwrap();
    insta::assert_snapshot!("column_sums_blocked", kernel(&portable, mm));
}

/// A layer's activation `h = relu(u * g + b)` read by a forward node, and in the backward pass
/// by an element-wise node, by a product through a transpose (`dAᵀ h`: B) and by a product as
/// its A operand (`h w2`), where `u` is read late too: [`recompute_activations`] gives the
/// element-wise reader one copy and each product one of its own.
fn operand_prologue_graph(rows: usize, c: usize, n: usize) -> Graph {
    operand_prologue_graph_with(rows, c, n, false)
}

/// Inputs `u` (rows x c), `g` and `b` (c), and a layer's activation `h = relu(u * g + b)`, as
/// DoRA's layers compute it: returns `u` and `h`.
fn activation(g: &mut GraphBuilder, rows: usize, c: usize) -> (NodeId, NodeId) {
    let u = g.add_input("u", vec![rows, c]);
    let scale = g.add_input("g", vec![c]);
    let bias = g.add_input("b", vec![c]);
    let mul = Op::Binary(Binary::Mul);
    let scaled = g.add(mul, &[u, scale], "scaled", "scaled").unwrap();
    let add = Op::Binary(Binary::Add);
    let out = g.add(add, &[scaled, bias], "out", "out").unwrap();
    let relu = Op::Unary(unary::RELU);
    let h = g.add(relu, &[out], "h", "h").unwrap();
    (u, h)
}

/// [`operand_prologue_graph`], or with `lean` its forward reader a product (`next = h w3`) and
/// the activation recomputed for it too (as `dorac train` does by default).
fn operand_prologue_graph_with(rows: usize, c: usize, n: usize, lean: bool) -> Graph {
    let mut g = GraphBuilder::new();
    let (u, h) = activation(&mut g, rows, c);
    let binary = |g: &mut GraphBuilder, op: Binary, a: NodeId, b: NodeId, name: &str| {
        g.add(Op::Binary(op), &[a, b], name, name).unwrap()
    };
    let next = match lean {
        true => {
            let w3 = g.add_input("w3", vec![c, n]);
            g.add(Op::MatMul, &[h, w3], "next", "next").unwrap()
        }
        false => g.add(Op::Unary(unary::EXP), &[h], "next", "next").unwrap(),
    };
    let dy = g.add_input("dy", vec![rows, c]);
    let back = binary(&mut g, Binary::Mul, dy, h, "back");
    let term = binary(&mut g, Binary::Mul, back, u, "term");
    let da = g.add_input("da", vec![rows, 16]);
    let perm = Op::Transpose { perm: vec![1, 0] };
    let da_t = g.add(perm, &[da], "da_t", "da_t").unwrap();
    let db = g.add(Op::MatMul, &[da_t, h], "db", "db").unwrap();
    let w2 = g.add_input("w2", vec![c, n]);
    let dx = g.add(Op::MatMul, &[h, w2], "dx", "dx").unwrap();
    for (name, value) in [("next", next), ("term", term), ("db", db), ("dx", dx)] {
        g.add_output(name, value);
    }
    let mut graph = g.finish();
    let backward = [back, term, da_t, db, dx].into();
    assert_eq!(
        recompute_activations(&mut graph, &backward, lean).unwrap(),
        1
    );
    graph
}

/// The products compute their copies of a recomputed activation as they load the operand (an
/// operand prologue): the copies get no buffer and no kernel, on the CPU template (the device
/// plan here), the 16 x 16 and the blocked templates (the portable plan, 37 and 70 rows), and
/// the values match the f64 reference.
#[test]
fn products_compute_recomputed_operands_as_they_load_them() {
    for (rows, c, n) in [(37, 50, 24), (70, 80, 72)] {
        let graph = operand_prologue_graph(rows, c, n);
        let mut rng = Rng::new(31);
        let shapes = [
            ("u", vec![rows, c]),
            ("g", vec![c]),
            ("b", vec![c]),
            ("dy", vec![rows, c]),
            ("da", vec![rows, 16]),
            ("w2", vec![c, n]),
        ];
        let feeds = random_feeds(shapes, &mut rng);
        let want = run_reference(&graph, &feeds);
        for plan in device_and_portable_plans(&graph) {
            // One copy is stored at most (the element-wise reader's, where it has no kernel to
            // share), and both products compute theirs.
            let stored = (plan.buffers.iter())
                .filter(|b| b.name.ends_with("/recomputed"))
                .count();
            assert!(stored <= 1, "{plan}");
            for product in ["db", "dx"] {
                let kernel = plan
                    .kernels
                    .iter()
                    .find(|k| k.labels[0] == product)
                    .unwrap();
                let copies = (kernel.labels.iter())
                    .filter(|l| l.ends_with("/recomputed"))
                    .count();
                assert_eq!(copies, 3, "{product}:\n{plan}");
            }
            assert_operand_graph_matches(&graph, &plan, &feeds, &want);
        }
    }
    // The device kernel of `db`, whose B operand is the prologue, pinned for review.
    let graph = operand_prologue_graph(37, 50, 24);
    let cpu = lavapipe_like();
    let plan = codegen::plan_with(&graph, &cpu).unwrap();
    let kernel = plan.kernels.iter().find(|k| k.labels[0] == "db").unwrap();
    insta::assert_snapshot!("operand_prologue_product", kernel.source);
}

/// Where the fusion rules cannot place a recomputation in a reader's kernel (here: kernels of
/// at most 5 bindings), the plan for a device takes it back: its readers read the original, as
/// if nothing had been recomputed, and the values still match the f64 reference.
#[test]
fn recomputations_without_a_host_read_the_original_again() {
    let graph = operand_prologue_graph(37, 50, 24);
    check_unhosted_taken_back(graph, 32);
}

/// Where every reader of the activation took a copy (recomputed for the forward products too)
/// and the fusion rules cannot place the copies (kernels of at most 5 bindings), the plan takes
/// them back all the same: one chain of copies becomes the forward value the others of its
/// group read (copies a kernel computes stay), none is left unhosted, the plan has fewer
/// kernels, and the values match the f64 reference.
#[test]
fn recomputations_whose_originals_are_gone_are_taken_back_onto_one_chain() {
    let graph = operand_prologue_graph_with(37, 50, 24, true);
    let copies = graph.recomputed().len();
    let graph = check_unhosted_taken_back(graph, 33);
    assert!(graph.recomputed().len() < copies);
}

/// A layer's `x Aᵀ` turned for a CPU driver (`codegen::turn_thin_products`), where `x` is the
/// previous layer's activation `h = relu(u * g + b)`, recomputed for its readers (as `dorac
/// train` does by default): the turned product reads `hᵀ` as its B, computing it as it loads it,
/// and `g` and `b` then vary along K alone: the columns template loads them once per step of K
/// (`b_column(p)`), not once per column. On the device plan (the columns template on lavapipe)
/// and the portable one, the values match the f64 reference.
#[test]
fn turned_product_loads_prologue_per_step() {
    let (rows, c) = (130, 260);
    let mut g = GraphBuilder::new();
    let (u, h) = activation(&mut g, rows, c);
    let a = g.add_input("a", vec![16, c]);
    let perm = Op::Transpose { perm: vec![1, 0] };
    let a_t = g.add(perm, &[a], "a_t", "a_t").unwrap();
    let xa = g.add(Op::MatMul, &[h, a_t], "xa", "xa").unwrap();
    let up = g.add_input("up", vec![16, 24]);
    let y = g.add(Op::MatMul, &[xa, up], "y", "y").unwrap();
    let dy = g.add_input("dy", vec![rows, c]);
    let term = g
        .add(Op::Binary(Binary::Mul), &[dy, u], "term", "term")
        .unwrap();
    let w2 = g.add_input("w2", vec![c, 8]);
    let hw = g.add(Op::MatMul, &[h, w2], "hw", "hw").unwrap();
    for (name, value) in [("y", y), ("term", term), ("hw", hw)] {
        g.add_output(name, value);
    }
    let mut graph = g.finish();
    let backward = [term, hw].into();
    assert_eq!(
        recompute_activations(&mut graph, &backward, true).unwrap(),
        1
    );
    assert_eq!(codegen::turn_thin_products(&mut graph).unwrap(), 1);
    let shapes = [
        ("u", vec![rows, c]),
        ("g", vec![c]),
        ("b", vec![c]),
        ("a", vec![16, c]),
        ("up", vec![16, 24]),
        ("dy", vec![rows, c]),
        ("w2", vec![c, 8]),
    ];
    let feeds = random_feeds(shapes, &mut Rng::new(37));
    let want = run_reference(&graph, &feeds);
    let product = |plan: &Plan| {
        let k = plan.kernels.iter().find(|k| k.labels[0] == "xa");
        k.unwrap_or_else(|| panic!("no kernel for xa:\n{plan}"))
            .clone()
    };
    let cpu = product(&codegen::plan_with(&graph, &lavapipe_like()).unwrap());
    assert!(
        cpu.source.contains("let bstep = b_column(p);"),
        "{}",
        cpu.source
    );
    for plan in device_and_portable_plans(&graph) {
        let copies = (product(&plan).labels.iter())
            .filter(|l| l.ends_with("/recomputed"))
            .count();
        assert_eq!(copies, 3, "{plan}");
        let exe = Executable::new(gpu(), &plan, &graph).unwrap();
        let outputs = ["y", "term", "hw"];
        let got = exe.step(&host(&feeds), &outputs).unwrap();
        for name in outputs {
            let got: Vec<f64> = got[name].iter().map(|&v| v as f64).collect();
            let err = relative_error(&got, &want[name].data);
            assert!(err < TOL, "'{name}': {err:e}\n{plan}");
        }
    }
}

/// Plans `graph` with kernels of at most 5 bindings, where some recomputations find no host,
/// takes them back, and checks that none is left unhosted, that the plan has fewer kernels and
/// that its values match the f64 reference on feeds drawn with `seed`; returns the graph.
fn check_unhosted_taken_back(mut graph: Graph, seed: u64) -> Graph {
    let options = PlanOptions {
        max_bindings: 5,
        ..PlanOptions::default()
    };
    let unhosted = codegen::unhosted_recomputations(&graph, &options).unwrap();
    assert!(!unhosted.is_empty());
    let before = codegen::plan_with(&graph, &options).unwrap().kernels.len();
    let undone = codegen::undo_unhosted_recomputations(&mut graph, &unhosted);
    assert!(undone > 0);
    assert!(codegen::unhosted_recomputations(&graph, &options)
        .unwrap()
        .is_empty());
    let plan = codegen::plan_with(&graph, &options).unwrap();
    assert!(
        plan.kernels.len() < before,
        "{before} kernels before:\n{plan}"
    );
    let mut rng = Rng::new(seed);
    let feeds: BTreeMap<String, Array> = (graph.inputs().iter())
        .map(|&i| {
            let node = graph.node(i);
            (node.name.clone(), random(&node.shape, &mut rng))
        })
        .collect();
    let want = run_reference(&graph, &feeds);
    assert_operand_graph_matches(&graph, &plan, &feeds, &want);
    graph
}

/// Runs `plan` of an [`operand_prologue_graph`] on `feeds` and compares every output with the
/// reference's `want` (1e-5 relative).
fn assert_operand_graph_matches(
    graph: &Graph,
    plan: &Plan,
    feeds: &BTreeMap<String, Array>,
    want: &BTreeMap<String, Array>,
) {
    let exe = Executable::new(gpu(), plan, graph).unwrap();
    let outputs = ["next", "term", "db", "dx"];
    let got = exe.step(&host(feeds), &outputs).unwrap();
    for name in outputs {
        let got: Vec<f64> = got[name].iter().map(|&v| v as f64).collect();
        let err = relative_error(&got, &want[name].data);
        assert!(err < 1e-5, "'{name}': {err:e}\n{plan}");
    }
}

/// A layer's forward and backward sums of two products: `y = relu(x Wᵀ + s (x Aᵀ) Bᵀ + bias)`
/// (Gemm with transB, the low-rank path scaled by the scalar `s`) and `dx = dy W + (dy B) A`
/// (MatMuls), over `lead` rows (a batch of matrices where `lead` has two axes, the weights
/// broadcast) of width `k`, `n` outputs and rank `r`. Returns the graph and the four products
/// (base, low-rank up, backward base, backward low-rank).
fn product_sums_graph(lead: &[usize], k: usize, n: usize, r: usize) -> (Graph, [NodeId; 4]) {
    product_sums_graph_with(lead, k, n, r, None)
}

/// [`product_sums_graph`] with `w` and `b` constants of the given values, where there are any.
fn product_sums_graph_with(
    lead: &[usize],
    k: usize,
    n: usize,
    r: usize,
    weights: Option<[Tensor; 2]>,
) -> (Graph, [NodeId; 4]) {
    let mut g = GraphBuilder::new();
    let rows = |last: usize| lead.iter().copied().chain([last]).collect::<Vec<_>>();
    let x = g.add_input("x", rows(k));
    let a = g.add_input("a", vec![r, k]);
    let (w, b) = match weights {
        Some([w, b]) => (g.add_const("w", w), g.add_const("b", b)),
        None => (g.add_input("w", vec![n, k]), g.add_input("b", vec![n, r])),
    };
    let s = g.add_input("s", vec![]);
    let bias = g.add_input("bias", vec![n]);
    let dy = g.add_input("dy", rows(n));
    let mut add = |op: Op, ins: &[NodeId], name: &str| g.add(op, ins, name, name).unwrap();
    let t = || Op::Transpose { perm: vec![1, 0] };
    let (w_t, a_t, b_t) = (
        add(t(), &[w], "w_t"),
        add(t(), &[a], "a_t"),
        add(t(), &[b], "b_t"),
    );
    // The batched case reads Wᵀ through a MatMul, which broadcasts it; the 2-D one through Gemm.
    let base = match lead.len() {
        1 => {
            let gemm = Op::Gemm {
                alpha: 1.0,
                beta: 0.0,
                trans_a: false,
                trans_b: true,
            };
            add(gemm, &[x, w], "base")
        }
        _ => add(Op::MatMul, &[x, w_t], "base"),
    };
    let xa = add(Op::MatMul, &[x, a_t], "xa");
    let up = add(Op::MatMul, &[xa, b_t], "up");
    let scaled = add(Op::Binary(Binary::Mul), &[s, up], "scaled");
    let sum = add(Op::Binary(Binary::Add), &[base, scaled], "sum");
    let biased = add(Op::Binary(Binary::Add), &[sum, bias], "biased");
    let y = add(Op::Unary(unary::RELU), &[biased], "y");
    let dx_base = add(Op::MatMul, &[dy, w], "dx_base");
    let dy_b = add(Op::MatMul, &[dy, b], "dy_b");
    let dx_low = add(Op::MatMul, &[dy_b, a], "dx_low");
    let dx = add(Op::Binary(Binary::Add), &[dx_low, dx_base], "dx");
    g.add_output("y", y);
    g.add_output("dx", dx);
    (g.finish(), [base, up, dx_base, dx_low])
}

/// Each layer's base product and low-rank path are one kernel, forward (scaled by `s` as A2
/// loads) and backward, on the CPU template (the device plan here), the 16 x 16 and the blocked
/// templates (the portable plan: 37 rows, 70 rows of 80 x 72) and over a batch of matrices with
/// broadcast weights: the second product's value has no buffer, and the outputs match the f64
/// reference.
#[test]
fn sums_of_products_accumulate_in_one_kernel() {
    let cases: [(&[usize], usize, usize, usize); 3] = [
        (&[37], 50, 24, 4),
        (&[70], 80, 72, 16),
        (&[2, 21], 50, 24, 4),
    ];
    for (lead, k, n, r) in cases {
        let (graph, [base, up, dx_base, dx_low]) = product_sums_graph(lead, k, n, r);
        let mut rng = Rng::new(41);
        let rows = |last: usize| lead.iter().copied().chain([last]).collect::<Vec<_>>();
        let shapes = [
            ("x", rows(k)),
            ("w", vec![n, k]),
            ("a", vec![r, k]),
            ("b", vec![n, r]),
            ("s", vec![]),
            ("bias", vec![n]),
            ("dy", rows(n)),
        ];
        let feeds = random_feeds(shapes, &mut rng);
        let want = run_reference(&graph, &feeds);
        for plan in device_and_portable_plans(&graph) {
            for (first, second) in [(base, up), (dx_low, dx_base)] {
                let kernel = plan.kernels.iter().find(|k| k.nodes.contains(&first));
                let kernel = kernel.unwrap();
                // The product of more multiply-adds anchors the kernel.
                let (anchor, other) = match first == base {
                    true => (first, second),
                    false => (second, first),
                };
                assert_eq!(kernel.nodes[0], anchor, "{lead:?}:\n{plan}");
                assert!(kernel.nodes.contains(&other), "{lead:?}:\n{plan}");
                assert!(!plan.node_buffers.contains_key(&other), "{plan}");
            }
            let exe = Executable::new(gpu(), &plan, &graph).unwrap();
            let got = exe.step(&host(&feeds), &["y", "dx"]).unwrap();
            for name in ["y", "dx"] {
                let got: Vec<f64> = got[name].iter().map(|&v| v as f64).collect();
                let err = relative_error(&got, &want[name].data);
                assert!(err < 1e-5, "{lead:?} '{name}': {err:e}\n{plan}");
            }
        }
    }
    // Both products' weights stored in half precision (`--storage f16`, constants of at least
    // 1024 elements): the kernel decodes W and B2 as it loads them.
    let (k, n, r) = (64, 48, 32);
    let mut rng = Rng::new(43);
    let mut weight = |shape: Vec<usize>| {
        let values = random(&shape, &mut rng);
        Tensor::f32(shape, values.data.iter().map(|&v| v as f32).collect())
    };
    let weights = [weight(vec![n, k]), weight(vec![n, r])];
    let (mut graph, [base, up, ..]) = product_sums_graph_with(&[70], k, n, r, Some(weights));
    let report = dorac::passes::half::store_half(&mut graph, dorac::ir::Half::F16);
    assert_eq!(report.tensors, 2);
    let shapes = [
        ("x", vec![70, k]),
        ("a", vec![r, k]),
        ("s", vec![]),
        ("bias", vec![n]),
        ("dy", vec![70, n]),
    ];
    let feeds = random_feeds(shapes, &mut rng);
    let want = run_reference(&graph, &feeds);
    for plan in device_and_portable_plans(&graph) {
        let halves = (plan.buffers.iter()).filter(|b| b.stored.is_some()).count();
        assert_eq!(halves, 2, "{plan}");
        let kernel = plan.kernels.iter().find(|k| k.nodes[0] == base).unwrap();
        assert!(kernel.nodes.contains(&up), "{plan}");
        let exe = Executable::new(gpu(), &plan, &graph).unwrap();
        let got = exe.step(&host(&feeds), &["y", "dx"]).unwrap();
        for name in ["y", "dx"] {
            let got: Vec<f64> = got[name].iter().map(|&v| v as f64).collect();
            let err = relative_error(&got, &want[name].data);
            assert!(err < 1e-5, "half weights, '{name}': {err:e}\n{plan}");
        }
    }
    // The device kernel of the forward sum on a CPU driver, pinned for review.
    let (graph, [base, ..]) = product_sums_graph(&[37], 50, 24, 4);
    let plan = codegen::plan_with(&graph, &lavapipe_like()).unwrap();
    let kernel = plan.kernels.iter().find(|k| k.nodes[0] == base).unwrap();
    insta::assert_snapshot!("product_sum_columns", kernel.source);
}

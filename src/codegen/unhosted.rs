//! Recomputations that cost a kernel, taken back. `passes::recompute` gives the backward readers
//! of an activation copies of it, expecting each to be computed inside a reader's kernel (a side
//! operand of an element-wise reader's epilogue, or an operand prologue of a product). Where the
//! fusion rules cannot place one there (the kernel would bind too many buffers, as in a portable
//! plan's 8, or a reader runs before the kernel that would compute it), the copy gets a kernel
//! of its own, and the activation it saves costs a kernel's worth of work and a buffer anyway.
//! Then every copy of that activation (and of the values computed with it) reads the original
//! again, which the forward pass still computes: the plan is the one without the recomputation.
//! Where the original is gone (its forward readers, products, took copies as they do by default,
//! `passes::recompute`'s `lean`), one chain of the copies takes its place instead
//! (`Patch::promote_recomputed`), and the group's other copies read that.
//! Runs on the graph about to be planned ([`plan_hosting_recomputations`], which
//! `runtime::Executable::plan_for` and `dorac compile`'s portable plan call), since only the
//! fusion rules for those options know.

use super::{fusion, plan_grouped, Plan, PlanOptions};
use crate::error::Result;
use crate::ir::{Graph, NodeId, Patch};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

/// [`super::plan_with`], after taking back the recomputations the fusion rules leave unhosted
/// (module docs; `graph` is then changed, and only then). Where there are none, as on every
/// inference graph, the fusion rules run once.
pub fn plan_hosting_recomputations(graph: &mut Cow<Graph>, options: &PlanOptions) -> Result<Plan> {
    let mut fusion = fusion::decide(graph, options)?;
    if !fusion.unhosted.is_empty() {
        let unhosted = std::mem::take(&mut fusion.unhosted);
        if undo_unhosted_recomputations(graph.to_mut(), &unhosted) > 0 {
            fusion = fusion::decide(graph, options)?;
        }
    }
    plan_grouped(graph, fusion, options)
}

/// The recomputations in `graph` that the fusion rules for `options` leave unhosted.
pub fn unhosted_recomputations(graph: &Graph, options: &PlanOptions) -> Result<BTreeSet<NodeId>> {
    if graph.recomputed().is_empty() {
        return Ok(BTreeSet::new());
    }
    Ok(fusion::decide(graph, options)?.unhosted)
}

/// Points the readers of every copy in a group of copies that holds one of `unhosted` (module
/// docs) back at the originals, where the originals are all still in the graph, or, where none
/// is (every forward reader took a copy), at one chain of the copies, which becomes a forward
/// value like any other; returns how many copies were taken back.
pub fn undo_unhosted_recomputations(graph: &mut Graph, unhosted: &BTreeSet<NodeId>) -> usize {
    if unhosted.is_empty() {
        return 0;
    }
    let copies = graph.recomputed().clone();
    // Copies that read each other are one group: they were made for one activation, or share
    // the pieces of one chain (GELU's).
    let mut group_of: BTreeMap<NodeId, usize> = BTreeMap::new();
    let mut groups: Vec<BTreeSet<NodeId>> = vec![];
    for &c in copies.keys() {
        if group_of.contains_key(&c) {
            continue;
        }
        let mut group = BTreeSet::new();
        let mut stack = vec![c];
        while let Some(n) = stack.pop() {
            if !copies.contains_key(&n) || !group.insert(n) {
                continue;
            }
            stack.extend(graph.inputs_of(n));
            stack.extend(graph.consumers(n));
        }
        for &n in &group {
            group_of.insert(n, groups.len());
        }
        groups.push(group);
    }
    let mut p = Patch::new(graph);
    let mut undone = 0;
    for group in &groups {
        if group.is_disjoint(unhosted) {
            continue;
        }
        if group.iter().all(|c| graph.contains(copies[c])) {
            for &c in group {
                p.replace(c, copies[&c].into());
                undone += 1;
            }
            continue;
        }
        // The originals are gone (every forward reader took a copy too, as recomputed
        // activations do by default): one chain of copies takes their place, and the others
        // read it.
        if group.iter().any(|c| graph.contains(copies[c])) {
            continue;
        }
        let Some(chain) = whole_chain(graph, group, &copies) else {
            continue;
        };
        // (`whole_chain` holds a copy of every original of the group.)
        for &c in group {
            match chain.get(&copies[&c]) {
                Some(&kept) if kept == c => p.promote_recomputed(c),
                Some(&kept) => p.replace(c, kept.into()),
                None => continue,
            }
            undone += 1;
        }
    }
    graph.apply(p.finish());
    graph.remove_dead();
    undone
}

/// A chain of copies in `group` that holds one copy of each of the group's originals, each
/// reading the chain's copies of the originals it read: the copies one reader was given (the
/// closure of a copy over its inputs in the group, the one covering the most originals). By
/// original; None when no closure covers them all once.
fn whole_chain(
    graph: &Graph,
    group: &BTreeSet<NodeId>,
    copies: &BTreeMap<NodeId, NodeId>,
) -> Option<BTreeMap<NodeId, NodeId>> {
    let originals: BTreeSet<NodeId> = group.iter().map(|c| copies[c]).collect();
    group.iter().find_map(|&head| {
        let mut chain = BTreeMap::new();
        let mut stack = vec![head];
        while let Some(c) = stack.pop() {
            if !group.contains(&c) {
                continue;
            }
            match chain.insert(copies[&c], c) {
                Some(other) if other != c => return None,
                Some(_) => continue,
                None => stack.extend(graph.inputs_of(c)),
            }
        }
        (chain.len() == originals.len()).then_some(chain)
    })
}

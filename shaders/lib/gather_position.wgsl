// The position an index value selects along a dim of `dim` elements: ids are stored as f32,
// rounded to the nearest integer, and a negative id counts from the end. -1 when the id falls
// outside the dim: the caller then gathers 0 (and reads position 0, never out of bounds).
fn gather_position(v: f32, dim: u32) -> i32 {
    let d = i32(dim);
    var p = i32(round(v)); // saturates for huge values
    if p < 0 {
        p = p + d;
    }
    return select(-1, p, p >= 0 && p < d);
}

//! Test helpers for the CPU layer ops: a tensor's values, closeness to float tolerance, and
//! an op's gradients against a reference's.

use candle_core::{Tensor, Var};

/// Every element of `t`, flattened.
pub(crate) fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Fails unless `ours` equals `reference` to 1e-5 of the reference's largest magnitude
/// (at least 1).
pub(crate) fn assert_close(ours: &[f32], reference: &[f32], what: &str) {
    assert_eq!(ours.len(), reference.len(), "{what}: lengths");
    let scale = reference.iter().fold(1f32, |m, v| m.max(v.abs()));
    let worst = ours
        .iter()
        .zip(reference)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst <= 1e-5 * scale,
        "{what}: off by {worst} at scale {scale}"
    );
}

/// Fails unless `ours` and `reference` (the same function of `vars`, computed two ways) are
/// close, and so are their gradients for each of `vars`, under a loss that weighs every
/// output differently (so that each gradient entry is distinct).
pub(crate) fn assert_same_outputs_and_gradients(
    ours: Tensor,
    reference: Tensor,
    vars: &[(&Var, &str)],
    context: &str,
) {
    assert_eq!(ours.dims(), reference.dims(), "{context}: shapes");
    assert_close(
        &values(&ours),
        &values(&reference),
        &format!("output, {context}"),
    );
    let weights = Tensor::randn(0f32, 1.0, ours.dims(), ours.device()).unwrap();
    let gradients = |y: Tensor| {
        (y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    };
    let (g_ours, g_reference) = (gradients(ours), gradients(reference));
    for (var, name) in vars {
        assert_close(
            &values(g_ours.get(var.as_tensor()).unwrap()),
            &values(g_reference.get(var.as_tensor()).unwrap()),
            &format!("{name} gradient, {context}"),
        );
    }
}

"""RCIG's maths against closed forms and finite differences, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_distill.functional.implicit import hvp, implicit_vjp
from lightning_distill.functional.linearize import LinearisedNet, linearised_forward, tangent_keys
from lightning_distill.functional.rcig import (
    SolverSettings,
    inner_loss,
    inner_system,
    meta_gradient,
    predict,
    support_set,
)
from lightning_distill.functional.solvers import adam_quadratic, conjugate_gradient, solve_spd
from lightning_distill.functional.trees import flatten, unflatten
from lightning_distill.nets import get_net

C = 3


def _net(seed: int = 0, beta: float = 4.0):
    torch.manual_seed(seed)
    net = get_net("convnet_rcig", 1, C, 8, width=3, depth=2, activation="softplus", softplus_beta=beta).double()
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    # Non-zero last-layer bias and kernel so every tangent matters.
    params["classifier.bias"] = torch.randn(C, dtype=torch.float64) * 0.1
    return net.eval(), params


def _delta(params, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(params[k].shape, generator=g, dtype=torch.float64) * scale for k in tangent_keys(params)}


def _x(n, seed=2):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_linearised_forward_is_the_jvp_of_the_network_with_the_kernel_tangent_masked():
    net, params = _net()
    delta = _delta(params)
    x = _x(5)
    feats, u = linearised_forward(net, params, {}, x, delta)
    call = torch.func.functional_call
    assert torch.allclose(feats, call(net, params, (x,), {"features_only": True}))
    eps = 1e-6
    plus = {k: v + eps * delta[k] if k in delta else v for k, v in params.items()}
    minus = {k: v - eps * delta[k] if k in delta else v for k, v in params.items()}
    fd = (call(net, plus, (x,)) - call(net, minus, (x,))) / (2 * eps)
    assert torch.allclose(u, fd, rtol=1e-7, atol=1e-9)
    # The kernel of the last layer carries no tangent: giving one is refused.
    with pytest.raises(KeyError, match="classifier.weight"):
        linearised_forward(net, params, {}, x, {**delta, "classifier.weight": params["classifier.weight"]})


def test_linearised_net_products_are_j_and_its_transpose():
    net, params = _net()
    x = _x(7)
    keys = tangent_keys(params)
    lin = LinearisedNet(net, params, {}, x, chunk=3)  # chunks must not change anything
    delta = _delta(params)
    v = flatten(delta, keys)
    _, u = linearised_forward(net, params, {}, x, delta)
    assert torch.allclose(lin.jvp(v), u)
    r = torch.randn(7, C, dtype=torch.float64)
    # <r, J v> == <Jᵀ r, v>
    assert torch.allclose((r * lin.jvp(v)).sum(), torch.dot(lin.vjp(r), v))


def test_the_explicit_jacobian_gives_the_same_products_and_system():
    from lightning_distill.functional.linearize import JacobianLinearisedNet

    net, params = _net()
    x = _x(5)
    keys = tangent_keys(params)
    lin = LinearisedNet(net, params, {}, x)
    jac = JacobianLinearisedNet(net, params, {}, x, chunk=2)
    v = flatten(_delta(params), keys)
    r = torch.randn(5, C, dtype=torch.float64)
    torch.testing.assert_close(jac.jvp(v), lin.jvp(v))
    torch.testing.assert_close(jac.vjp(r), lin.vjp(r))
    torch.testing.assert_close(jac.features, lin.features)
    y = torch.randn(5, C, dtype=torch.float64)
    free = inner_system(net, params, {}, x, y, 0.1)
    formed = inner_system(net, params, {}, x, y, 0.1, jacobian_mb=10)
    assert isinstance(formed.lin, JacobianLinearisedNet) and isinstance(free.lin, LinearisedNet)
    torch.testing.assert_close(formed.matvec(v), free.matvec(v))
    torch.testing.assert_close(formed.b, free.b)
    # Too large for the cap: matrix-free.
    assert isinstance(inner_system(net, params, {}, x, y, 0.1, jacobian_mb=1e-6).lin, LinearisedNet)


def test_hvp_forward_over_reverse_matches_an_explicit_hessian():
    torch.manual_seed(0)
    w1 = torch.randn(4, 3, dtype=torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, dtype=torch.float64)

    def loss(w):  # a tiny tanh net, non-quadratic
        return ((torch.tanh(x @ w.reshape(4, 3).T) @ torch.ones(4, dtype=torch.float64) - y) ** 2).mean()

    w = w1.reshape(-1)
    v = torch.randn(12, dtype=torch.float64)
    h = torch.autograd.functional.hessian(loss, w)
    assert torch.allclose(hvp(loss, w, v), h @ v, rtol=1e-10, atol=1e-12)


def test_inner_system_is_the_exact_hessian_gradient_and_value_of_the_inner_loss():
    net, params = _net()
    x = _x(4)
    y = torch.randn(4, C, dtype=torch.float64)
    ridge = 0.05
    keys = tangent_keys(params)
    like = {k: params[k] for k in keys}
    system = inner_system(net, params, {}, x, y, ridge)
    delta = flatten(_delta(params), keys)
    v = flatten(_delta(params, seed=5), keys)

    def f(d):
        return inner_loss(net, params, {}, x, y, unflatten(d, like, keys), ridge)

    assert torch.allclose(system.matvec(v), hvp(f, delta, v), rtol=1e-8, atol=1e-12)
    grad = torch.func.grad(f)(delta)
    assert torch.allclose(grad, system.matvec(delta) - system.b, rtol=1e-8, atol=1e-12)
    assert system.loss(delta) == pytest.approx(float(f(delta)), rel=1e-9)


def test_the_analytic_last_layer_is_the_dense_ridge_least_squares_solution():
    net, params = _net()
    x = _x(5)
    y = torch.randn(5, C, dtype=torch.float64)
    delta = _delta(params)
    ridge = 0.3
    feats, u = linearised_forward(net, params, {}, x, delta)
    # Dense: W* = argmin ½‖Y − U − ΦW‖² + ½λ‖W‖², by the normal equations.
    d = feats.shape[1]
    w = torch.linalg.solve(feats.T @ feats + ridge * torch.eye(d, dtype=torch.float64), feats.T @ (y - u))
    dense = 0.5 * (y - u - feats @ w).pow(2).sum() + 0.5 * ridge * w.pow(2).sum()
    sq = sum(t.pow(2).sum() for t in delta.values())
    expected = (dense + 0.5 * ridge * sq) / (5 * C)
    assert float(inner_loss(net, params, {}, x, y, delta, ridge)) == pytest.approx(float(expected), rel=1e-9)
    # The prediction through the eliminated layer is φᵀW* + u on new inputs.
    xt = _x(6, seed=9)
    ft, ut = linearised_forward(net, params, {}, xt, delta)
    assert torch.allclose(predict(ft, ut, feats, u, y, ridge), ut + ft @ w, rtol=1e-8, atol=1e-10)


def _spd(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T / n + 0.5 * torch.eye(n, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def test_each_solver_reaches_the_dense_solution_of_a_small_spd_system():
    h, b = _spd()
    exact = torch.linalg.solve(h, b)
    cg = conjugate_gradient(lambda v: h @ v, b, steps=100, tol=1e-12)
    assert torch.allclose(cg.x, exact, rtol=1e-9, atol=1e-10)
    assert cg.steps <= 12 + 1
    adam = adam_quadratic(lambda v: h @ v, b, steps=3000, lr=1e-2)
    assert torch.allclose(adam.x, exact, rtol=1e-4, atol=1e-4)
    # q(x) = ½xᵀHx − bᵀx is recorded from the start and ends at its minimum −½bᵀH⁻¹b.
    assert adam.losses[0] == 0.0
    assert adam.losses[-1] == pytest.approx(float(-0.5 * b @ exact), rel=1e-6)
    assert torch.equal(solve_spd(lambda v: h @ v, b, "cg", steps=100, tol=1e-12).x, cg.x)
    with pytest.raises(ValueError, match="unknown solver 'lbfgs'"):
        solve_spd(lambda v: h @ v, b, "lbfgs")


def test_implicit_gradient_of_ridge_regression_matches_its_closed_form():
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ys = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    xt = torch.randn(7, 3, generator=g, dtype=torch.float64)
    yt = torch.randn(7, generator=g, dtype=torch.float64)
    lam = 0.2

    def w_star(x, y):
        return torch.linalg.solve(x.T @ x + lam * torch.eye(3, dtype=torch.float64), x.T @ y)

    def outer(w):
        return 0.5 * (xt @ w - yt).pow(2).sum()

    # Closed form: autograd straight through the dense solve.
    gx, gy = torch.autograd.grad(outer(w_star(xs, ys)), [xs, ys])

    def inner(d, x, y):
        return 0.5 * (x @ d["w"] - y).pow(2).sum() + 0.5 * lam * d["w"].pow(2).sum()

    w = w_star(xs, ys).detach()
    h = xs.detach().T @ xs.detach() + lam * torch.eye(3, dtype=torch.float64)
    gw = torch.func.grad(outer)(w)
    v = torch.linalg.solve(h, gw)
    ix, iy = implicit_vjp(inner, {"w": w}, {"w": v}, [xs, ys])
    # The outer loss does not depend on (xs, ys) directly: the meta-gradient is the implicit term alone.
    assert torch.allclose(ix, gx, rtol=1e-10, atol=1e-12)
    assert torch.allclose(iy, gy, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("use_flip", [False, True])
def test_the_whole_rcig_meta_gradient_matches_finite_differences(use_flip):
    net, params = _net(beta=3.0)
    n = 3
    x_syn = _x(n, seed=11).requires_grad_(True)
    y_syn = F.one_hot(torch.arange(n) % C, C).double() - 1 / C + 0.05 * torch.randn(n, C, dtype=torch.float64)
    y_syn.requires_grad_(True)
    x_real = _x(8, seed=12)
    y_real = torch.arange(8) % C
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    ridge = 0.05
    exact = SolverSettings("cg", steps=2000, tol=1e-13)

    def outer_value(xs, ys, t):
        # L_out(δ*(S), S) with δ* solved exactly: the function whose gradient RCIG approximates.
        xs_sup, ys_sup = support_set(xs, ys, use_flip)
        system = inner_system(net, params, {}, xs_sup, ys_sup, ridge)
        sol = exact.solve(system, system.b)
        keys = tangent_keys(params)
        d = unflatten(sol.x, {k: params[k] for k in keys}, keys)
        fs, us = linearised_forward(net, params, {}, xs_sup, d)
        ft, ut = linearised_forward(net, params, {}, x_real, d)
        pred = predict(ft, ut, fs, us, ys_sup, ridge)
        return float(F.cross_entropy(pred * t.exp(), y_real))

    mg = meta_gradient(
        net,
        params,
        {},
        x_syn,
        y_syn,
        x_real,
        y_real,
        tau,
        ridge,
        exact,
        exact,
        use_flip=use_flip,
        clip_implicit=False,
    )
    g = torch.Generator().manual_seed(3)
    eps = 1e-5
    for name, base, grad in (("x", x_syn, mg.grads["x_syn"]), ("y", y_syn, mg.grads["y_syn"])):
        for _ in range(2):
            d = torch.randn(base.shape, generator=g, dtype=torch.float64)
            args_p = {"x": x_syn.detach(), "y": y_syn.detach()}
            args_m = dict(args_p)
            args_p[name] = base.detach() + eps * d
            args_m[name] = base.detach() - eps * d
            fd = outer_value(args_p["x"], args_p["y"], tau.detach())
            fd -= outer_value(args_m["x"], args_m["y"], tau.detach())
            fd /= 2 * eps
            assert float((grad * d).sum()) == pytest.approx(fd, rel=1e-5, abs=1e-9), name
    fd_tau = (
        outer_value(x_syn.detach(), y_syn.detach(), tau.detach() + eps)
        - outer_value(x_syn.detach(), y_syn.detach(), tau.detach() - eps)
    ) / (2 * eps)
    assert float(mg.grads["log_temperature"]) == pytest.approx(fd_tau, rel=1e-6)
    # The implicit term is not negligible here: the direct term alone is measurably off.
    d = torch.randn(x_syn.shape, generator=g, dtype=torch.float64)
    assert float(mg.implicit["x_syn"].norm()) > 1e-3 * float(mg.direct["x_syn"].norm())


def test_implicit_term_is_clipped_to_the_direct_norm():
    net, params = _net()
    x_syn = _x(3, seed=1).requires_grad_(True)
    y_syn = F.one_hot(torch.arange(3), C).double() - 1 / C
    x_real, y_real = _x(6, seed=2), torch.arange(6) % C
    tau = torch.zeros((), dtype=torch.float64, requires_grad=True)
    s = SolverSettings("cg", steps=200, tol=1e-10)
    free = meta_gradient(net, params, {}, x_syn, y_syn, x_real, y_real, tau, 1e-4, s, s, clip_implicit=False)
    clipped = meta_gradient(net, params, {}, x_syn, y_syn, x_real, y_real, tau, 1e-4, s, s, clip_implicit=True)
    assert clipped.implicit["x_syn"].norm() <= clipped.direct["x_syn"].norm() * (1 + 1e-12)
    if free.implicit["x_syn"].norm() > free.direct["x_syn"].norm():
        assert clipped.logs["implicit_clipped"] == 1.0
    assert mg_none(clipped)


def mg_none(mg) -> bool:
    # Fixed (hard) labels get no gradient at all.
    return mg.grads["y_syn"] is None and mg.implicit["y_syn"] is None

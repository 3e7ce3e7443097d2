"""The BDS update rules, one mini-batch at a time; tasks/bds.py streams the pool through them.

Both forms alternate a model step and a logit step on the losses of the same (pre-update) forward:

    SEAL form (value function dropped, v = 0):
        theta: lambda f_V(theta) + (1 - lambda) mean_b( sg(w_b) l_b(theta) )
        z:     mean_b( w_b(z) sg(l_b(theta)) )
    value-function form (F2SA / V-PBGD style; the default):
        theta: as above
        u:     mean_b( sg(w_b) l_b(u) )          u tracks v(z) = min_u (1/N) sum_i w_i(z) l_i(u)
        z:     mean_b( w_b(z) sg(l_b(theta) - l_b(u)) )

By Danskin's theorem dv/dw_i = l_i(u*)/N, so subtracting l_b(u) removes each sample's irreducible loss from
the logit gradient: a sample that is hard for every model is no longer mistaken for one that conflicts with
the validation set (see shared/research/bds_value_function).
"""
from __future__ import annotations


def sample_weights(logits, weighting: str, active=None):
    """`softmax`: M softmax(z) over the M active samples, so the active weights average 1; `sigmoid`:
    2 sigmoid(z), each in (0, 2). Inactive samples (gated before weighting) weigh 0 and get no gradient."""
    import torch

    if weighting == "softmax":
        if active is None:
            return logits.numel() * torch.softmax(logits, dim=0)
        masked = logits.masked_fill(~active, float("-inf"))
        return active.sum() * torch.softmax(masked, dim=0)
    weights = 2 * torch.sigmoid(logits)
    return weights if active is None else weights * active


def model_step(loss, optimizer, params, max_grad_norm: float) -> None:
    import torch

    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()


def _logit_step(logits, index, signal, weighting: str, logit_optimizer, active) -> float:
    logit_loss = (sample_weights(logits, weighting, active)[index] * signal).mean()
    logit_optimizer.zero_grad()
    logit_loss.backward()
    logit_optimizer.step()
    return logit_loss.item()


def bds_step(val_loss, train_losses, index, logits, lam: float, weighting: str, model_optimizer, logit_optimizer,
             model_params, max_grad_norm: float, active=None) -> tuple[float, float]:
    """One SEAL-form update. `train_losses` are the per-sample losses l_b of the pool samples `index`,
    `val_loss` the mean validation loss of the mini-batch; both still carry the model's graph."""
    w_batch = sample_weights(logits, weighting, active)[index].detach()
    model_loss = lam * val_loss + (1 - lam) * (w_batch * train_losses).mean()
    model_step(model_loss, model_optimizer, model_params, max_grad_norm)
    return model_loss.item(), _logit_step(logits, index, train_losses.detach(), weighting, logit_optimizer, active)


def value_function_step(val_loss, theta_losses, u_losses_fn, index, logits, lam: float, weighting: str,
                        theta_optimizer, u_optimizer, logit_optimizer, theta_params, u_params, max_grad_norm: float,
                        active=None) -> tuple[float, float, float]:
    """One value-function update. `u_losses_fn()` forwards the same pool samples through u (called after the
    theta step, which does not change u); the signal l_b(theta) - l_b(u) uses both pre-update forwards."""
    w_batch = sample_weights(logits, weighting, active)[index].detach()
    theta_loss = lam * val_loss + (1 - lam) * (w_batch * theta_losses).mean()
    model_step(theta_loss, theta_optimizer, theta_params, max_grad_norm)
    u_losses = u_losses_fn()
    u_loss = (w_batch * u_losses).mean()
    model_step(u_loss, u_optimizer, u_params, max_grad_norm)
    signal = theta_losses.detach() - u_losses.detach()
    return theta_loss.item(), u_loss.item(), _logit_step(logits, index, signal, weighting, logit_optimizer, active)

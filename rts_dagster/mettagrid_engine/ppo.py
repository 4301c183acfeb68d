"""The learners: PPO with a small torch MLP (the real learner), and a uniform random policy
(no torch; the smoke tests' stand-in). Both follow one protocol: `act(obs)` during the
rollout, `observe(rewards, dones)` after each step, `update(next_obs)` once per epoch.

torch is imported lazily, inside `PPOPolicy`, so the core install and the smoke test need
only mettagrid: `pip install -e '.[mettagrid]'` adds torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

TORCH_MISSING = (
    "the MettaGrid PPO learner needs PyTorch: install the extra: pip install -e '.[mettagrid]' "
    "(on a CPU-only machine prefer a CPU wheel of torch 2.13.0; PyPI's default is the CUDA build)"
)


class Policy(Protocol):
    name: str

    def act(self, obs: np.ndarray) -> np.ndarray: ...

    def observe(self, rewards: np.ndarray, dones: np.ndarray) -> None: ...

    def update(self, next_obs: np.ndarray) -> dict[str, float]: ...

    def settings(self) -> dict[str, Any]: ...


class RandomPolicy:
    """Uniform random actions from a seeded generator (deterministic given the seed)."""

    name = "random"

    def __init__(self, n_actions: int, seed: int) -> None:
        self.n_actions = n_actions
        self.rng = np.random.default_rng([seed, 7])

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.rng.integers(0, self.n_actions, size=obs.shape[0], dtype=np.int32)

    def observe(self, rewards: np.ndarray, dones: np.ndarray) -> None:
        return None

    def update(self, next_obs: np.ndarray) -> dict[str, float]:
        return {}

    def settings(self) -> dict[str, Any]:
        return {"type": "random"}


@dataclass(frozen=True)
class PPOConfig:
    """PPO settings measured to learn the reach and maze families within ~1 min here."""

    hidden: int = 128
    learning_rate: float = 1e-3
    gamma: float = 0.97
    gae_lambda: float = 0.95
    clip: float = 0.2
    entropy_coef: float = 0.01
    value_coef: float = 0.5
    update_epochs: int = 4
    minibatch_size: int = 256
    max_grad_norm: float = 0.5


def import_torch() -> Any:
    """torch, or an ImportError naming the extra to install."""
    try:
        import torch
    except ImportError as error:
        raise ImportError(TORCH_MISSING) from error
    return torch


class PPOPolicy:
    """Clipped PPO with GAE: an MLP (obs -> hidden -> hidden, tanh) with policy and value
    heads, one update per epoch over that epoch's rollout. Seeded through torch's global
    generator (`torch.manual_seed`); deterministic for a fixed thread count."""

    name = "ppo"

    def __init__(
        self,
        obs_size: int,
        n_actions: int,
        seed: int,
        config: PPOConfig | None = None,
        threads: int | None = None,
    ) -> None:
        torch = import_torch()
        self.torch, self.config = torch, config or PPOConfig()
        if threads is not None:
            torch.set_num_threads(int(threads))
        torch.manual_seed(int(seed))
        nn, h = torch.nn, self.config.hidden
        self.body = nn.Sequential(nn.Linear(obs_size, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh())
        self.pi = nn.Linear(h, n_actions)
        self.vf = nn.Linear(h, 1)
        self.params = [
            *self.body.parameters(),
            *self.pi.parameters(),
            *self.vf.parameters(),
        ]
        self.optimizer = torch.optim.Adam(self.params, lr=self.config.learning_rate)
        self._clear()

    def _clear(self) -> None:
        self._obs: list[Any] = []
        self._actions: list[Any] = []
        self._logp: list[Any] = []
        self._values: list[Any] = []
        self._rewards: list[np.ndarray] = []
        self._dones: list[np.ndarray] = []

    def _forward(self, obs: Any) -> tuple[Any, Any]:
        hidden = self.body(obs)
        return self.pi(hidden), self.vf(hidden).squeeze(-1)

    def act(self, obs: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(obs, dtype=np.float32))
        with torch.no_grad():
            logits, value = self._forward(x)
            dist = torch.distributions.Categorical(logits=logits)
            action = dist.sample()
        self._obs.append(x)
        self._actions.append(action)
        self._logp.append(dist.log_prob(action))
        self._values.append(value)
        return action.numpy().astype(np.int32)

    def observe(self, rewards: np.ndarray, dones: np.ndarray) -> None:
        self._rewards.append(np.asarray(rewards, dtype=np.float32))
        self._dones.append(np.asarray(dones, dtype=np.float32))

    def update(self, next_obs: np.ndarray) -> dict[str, float]:
        torch, cfg = self.torch, self.config
        with torch.no_grad():
            _, last_value = self._forward(torch.from_numpy(np.asarray(next_obs, np.float32)))
        values = torch.stack(self._values)
        rewards = torch.from_numpy(np.stack(self._rewards))
        not_done = 1.0 - torch.from_numpy(np.stack(self._dones))
        advantages = torch.zeros_like(rewards)
        running = torch.zeros_like(last_value)
        for t in reversed(range(rewards.shape[0])):  # GAE: a recursion over time steps
            next_value = last_value if t == rewards.shape[0] - 1 else values[t + 1]
            delta = rewards[t] + cfg.gamma * next_value * not_done[t] - values[t]
            running = delta + cfg.gamma * cfg.gae_lambda * not_done[t] * running
            advantages[t] = running
        returns = (advantages + values).reshape(-1)
        advantages = advantages.reshape(-1)
        obs = torch.cat(self._obs)
        actions = torch.cat(self._actions)
        old_logp = torch.cat(self._logp)
        self._clear()
        losses = []
        for _ in range(cfg.update_epochs):
            for batch in torch.randperm(actions.shape[0]).split(cfg.minibatch_size):
                logits, value = self._forward(obs[batch])
                dist = torch.distributions.Categorical(logits=logits)
                ratio = (dist.log_prob(actions[batch]) - old_logp[batch]).exp()
                adv = advantages[batch]
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                policy_loss = -torch.min(
                    ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv
                ).mean()
                value_loss = ((value - returns[batch]) ** 2).mean()
                entropy = dist.entropy().mean()
                loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
                self.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                losses.append((policy_loss.item(), value_loss.item(), entropy.item()))
        policy_loss, value_loss, entropy = np.mean(losses, axis=0)
        return {
            "losses/policy_loss": float(policy_loss),
            "losses/value_loss": float(value_loss),
            "losses/entropy": float(entropy),
        }

    def settings(self) -> dict[str, Any]:
        return {"type": "ppo", **asdict(self.config)}

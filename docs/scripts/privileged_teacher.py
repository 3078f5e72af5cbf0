"""A teacher that reads the track, and its clone onto the linear controller over [z; h]
(docs/experiments.md, "Where the runs on the faster machine lose their points").

The teacher sees what the agent never does: Gymnasium's track points and the car's position,
heading and speed. It steers by pure pursuit toward a point of the centre line a few points
ahead (farther when fast) and plans its speed from the curvature ahead (the fastest speed from
which it can still brake to every coming point's limit). `drive` scores it alone; `clone` fits
C to its actions by DAgger rounds: round 0 the teacher drives, round r the learner drives with
probability 1 - beta**r at each step, every visited state is labelled with the teacher's action,
and C is refitted on all of them. `--test` tracks then score the learner alone.

    python docs/scripts/privileged_teacher.py drive 20
    python docs/scripts/privileged_teacher.py clone runs/seed7 --rounds 4 --episodes 6 --beta 0.5

Tracks: the teacher's 300000 on, the clone's rounds 310000 on, its test 320000 on (official env,
none of them evaluation, check or selection tracks).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from worldmodels.artifacts import load_world_model
from worldmodels.envs.gymnasium_backend import make_official_env
from worldmodels.models import (
    LinearController,
    batched_controller_actions,
    controller_param_count,
)

POINT_SPACING = 21 / 6  # Gymnasium's TRACK_DETAIL_STEP: the distance between track points


class Teacher:
    def __init__(self, a_lat, a_brake, v_max, k_gas, k_brake, ease):
        self.a_lat, self.a_brake, self.v_max = a_lat, a_brake, v_max
        self.k_gas, self.k_brake, self.ease = k_gas, k_brake, ease

    def reset(self, car_racing) -> None:
        """The track's points and each point's speed limit, sqrt(lateral grip / curvature)."""
        self.xy = np.array(car_racing.track)[:, 2:4]
        self.n = len(self.xy)
        d = np.roll(self.xy, -1, 0) - self.xy
        heading = np.arctan2(d[:, 1], d[:, 0])
        turn = np.abs((np.roll(heading, -2) - np.roll(heading, 2) + np.pi) % (2 * np.pi) - np.pi)
        kappa = turn / (4 * POINT_SPACING) + 1e-6
        self.limit = np.minimum(np.sqrt(self.a_lat / kappa), self.v_max)
        self.i = 0

    def act(self, car_racing) -> np.ndarray:
        car = car_racing.car
        pos = np.array(car.hull.position)
        speed = float(np.hypot(*car.hull.linearVelocity))
        forward = np.array(car.hull.GetWorldVector((0, 1)))
        # the nearest point, near the last one (a track may pass close to itself) unless lost
        near = (self.i + np.arange(-10, 40)) % self.n
        d2 = ((self.xy[near] - pos) ** 2).sum(1)
        if d2.min() > 15**2:
            near = np.arange(self.n)
            d2 = ((self.xy - pos) ** 2).sum(1)
        self.i = int(near[np.argmin(d2)])
        to = self.xy[(self.i + int(round(3 + 0.06 * speed))) % self.n] - pos
        angle = math.atan2(forward[0] * to[1] - forward[1] * to[0], forward @ to)
        steer = float(np.clip(-2.0 * angle, -1, 1))
        ahead = np.arange(40)
        limits = self.limit[(self.i + ahead) % self.n]
        target = float(np.min(np.sqrt(limits**2 + 2 * self.a_brake * ahead * POINT_SPACING)))
        gas = float(np.clip((target - speed) * self.k_gas, 0, 1))
        brake = float(np.clip((speed - target - 3) * self.k_brake, 0, 0.8))
        # a rear-wheel-drive car at full gas and full lock spins: less gas the more it steers
        return np.array([steer, gas * (1 - self.ease * abs(steer)), brake])


def drive_teacher(args) -> None:
    env, teacher = make_official_env(), teacher_from(args)
    results = []
    for seed in range(300000, 300000 + args.tracks):
        env.reset(seed=seed)
        u = env.unwrapped
        teacher.reset(u)
        total, steps = 0.0, 0
        while steps < 1000:
            steps += 1
            _, reward, terminated, truncated, _ = env.step(teacher.act(u))
            total += reward
            if terminated or truncated:
                break
        results.append((total, steps, len(u.track) - u.tile_visited_count))
        print(f"track {seed}: {total:.1f} in {steps} steps, {results[-1][2]} tiles missed")
    summary(f"teacher on {args.tracks} tracks", results)


def summary(name: str, results: list[tuple[float, int, int]]) -> dict:
    returns = np.array([r[0] for r in results])
    line = {
        "mean": round(float(returns.mean()), 1),
        "std": round(float(returns.std()), 1),
        "laps": float(np.mean([r[2] == 0 for r in results])),
        "steps": round(float(np.mean([r[1] for r in results]))),
    }
    print(f"{name}: {json.dumps(line)}", flush=True)
    return line


def mixed_episode(env, agent, teacher, params, seed, beta):
    """One episode where each step the teacher acts with probability beta, else the learner;
    returns every step's input [z; h], the teacher's action there, and the result."""
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    u = env.unwrapped
    teacher.reset(u)
    agent.reset(1)
    inputs, labels, total, steps = [], [], 0.0, 0
    with torch.inference_mode():
        while steps < 1000:
            steps += 1
            z = agent.encode(obs[None])
            x = torch.cat([z, agent.h], 1)
            label = teacher.act(u)
            if rng.random() < beta:
                action = torch.as_tensor(label, dtype=torch.float32)[None]
            else:
                action = batched_controller_actions(params[None], x)
            inputs.append(x[0].clone())
            labels.append(label.astype(np.float32))
            agent.h, agent.c = agent.mdnrnn.advance(z, action, agent.h, agent.c)
            obs, reward, terminated, truncated, _ = env.step(action[0].numpy().astype(np.float64))
            total += reward
            if terminated or truncated:
                break
    result = (total, steps, len(u.track) - u.tile_visited_count)
    return torch.stack(inputs), torch.as_tensor(np.array(labels)), result


def fit(inputs, labels, start, iters=600, lr=0.02, l2=1e-4):
    """C's flat vector minimising the squared error of its squashed actions to the teacher's."""
    controller = LinearController.from_flat(start)
    opt = torch.optim.Adam(controller.parameters(), lr=lr)
    n_weights = 3 * controller.input_dim
    for _ in range(iters):
        weight = controller.params[:n_weights]
        loss = ((controller(inputs) - labels) ** 2).mean() + l2 * (weight**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        r2 = 1 - ((controller(inputs) - labels) ** 2).mean(0) / labels.var(0)
    steer, gas, brake = r2.tolist()
    print(f"  fit on {len(inputs)} steps: R² steer {steer:.3f}, gas {gas:.3f}, brake {brake:.3f}")
    return controller.flat()


def clone(args) -> None:
    agent = load_world_model(args.run)
    env, teacher = make_official_env(), teacher_from(args)
    params = torch.zeros(controller_param_count(agent.input_dim))
    all_inputs, all_labels = [], []
    seed = 310000
    for r in range(args.rounds):
        start, results = time.time(), []
        for _ in range(args.episodes):
            inputs, labels, result = mixed_episode(env, agent, teacher, params, seed, args.beta**r)
            seed += 1
            all_inputs.append(inputs)
            all_labels.append(labels)
            results.append(result)
        summary(
            f"round {r} (teacher's share {args.beta**r:.3f}, {time.time() - start:.0f} s)", results
        )
        params = fit(torch.cat(all_inputs), torch.cat(all_labels), params)
    results = [
        mixed_episode(env, agent, teacher, params, 320000 + i, 0.0)[2] for i in range(args.test)
    ]
    summary(f"the learner alone on {args.test} fresh tracks", results)


def teacher_from(args) -> Teacher:
    return Teacher(args.a_lat, args.a_brake, args.v_max, args.k_gas, args.k_brake, args.ease)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    drive = sub.add_parser("drive", help="the teacher alone on official tracks 300000 on")
    drive.add_argument("tracks", type=int)
    cl = sub.add_parser("clone", help="DAgger rounds onto C with a run's V and M")
    cl.add_argument("run", type=Path)
    cl.add_argument("--rounds", type=int, default=4)
    cl.add_argument("--episodes", type=int, default=6, help="episodes a round")
    cl.add_argument("--beta", type=float, default=0.5, help="teacher's share in round r: beta**r")
    cl.add_argument("--test", type=int, default=8, help="fresh tracks for the learner alone")
    for p in (drive, cl):
        p.add_argument("--a-lat", type=float, default=120.0, help="lateral grip for the limits")
        p.add_argument("--a-brake", type=float, default=60.0, help="deceleration it plans with")
        p.add_argument("--v-max", type=float, default=110.0)
        p.add_argument("--k-gas", type=float, default=0.05, help="gas per unit of speed deficit")
        p.add_argument("--k-brake", type=float, default=0.03, help="brake per unit of excess")
        p.add_argument("--ease", type=float, default=0.8, help="gas times 1 - ease * |steer|")
    args = parser.parse_args()
    drive_teacher(args) if args.command == "drive" else clone(args)


if __name__ == "__main__":
    main()

"""`python -m lit_grpo serve-rewards`: serve rewards over HTTP for `RemoteReward` clients.

The config is YAML in the CLI's own terms: `rewards:` a list of `class_path` entries (any
lit_grpo `Reward`, or your own), `segmenter:` the segmenter for the rewards that need one
where the trainer sends no detections (default `ColourSegmenter`), `device:`, `host:`,
`port:`. The server is `lit_grpo.rewards.server` (FastAPI on uvicorn); it stops on Ctrl+C
or SIGTERM.
"""

import sys

HELP = "serve rewards over HTTP to trainers (RemoteReward), from a YAML of rewards"

EPILOG = """\
example (configs/rewards/serve_spatial.yaml):
  python -m lit_grpo serve-rewards --config configs/rewards/serve_spatial.yaml --port 8765
and in the trainer's config:
  rewards:
    - class_path: lit_grpo.rewards.RemoteReward
      init_args: {url: "http://127.0.0.1:8765"}
endpoints: GET /health (versions, rewards, batches served), POST /score (docs/rewards.md)
"""


def parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from lit_grpo.perception.segmenters import Segmenter
    from lit_grpo.rewards.base import Reward

    p = ArgumentParser(
        prog="python -m lit_grpo serve-rewards",
        description=HELP,
        epilog=EPILOG,
        env_prefix=None,
        default_env=False,
    )
    p.add_argument("--config", action=ActionConfigFile, help="the rewards YAML")
    p.add_argument("--rewards", type=list[Reward], required=True, help="the served rewards")
    p.add_argument(
        "--segmenter",
        type=Segmenter | None,
        default=None,
        help="segments requests that bring no detections (default: ColourSegmenter)",
    )
    p.add_argument("--device", type=str, default="cpu", help="where the rewards run (cpu)")
    p.add_argument("--host", type=str, default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8765, help="port to listen on; 0 picks a free one")
    return p


def main(argv: list[str]) -> int:
    p = parser()
    cfg = p.parse_args(argv)
    built = p.instantiate_classes(cfg)

    import torch

    from lit_grpo.checks import ConfigError
    from lit_grpo.rewards.scoring import Scorer
    from lit_grpo.rewards.server import RewardService, listening_socket, uvicorn_server
    from lit_grpo.rewards.wire import versions

    if torch.device(built.device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {built.device}: this machine has no CUDA GPU; use --device cpu")
    if not built.rewards:
        raise ConfigError("rewards: the list is empty; name at least one reward to serve")
    service = RewardService(Scorer(built.rewards, built.segmenter), built.device)
    try:
        sock = listening_socket(built.host, built.port)
    except OSError as err:
        raise ConfigError(f"cannot listen on {built.host}:{built.port}: {err.strerror}") from err
    port = sock.getsockname()[1]
    names = ", ".join(f"{type(r).__name__} {r.name!r}" for r in service.scorer.rewards)
    v = versions()
    print(
        f"lit_grpo serve-rewards: {names} on http://{built.host}:{port} "
        f"({built.device}; protocol {v['protocol']}, lit_grpo {v['lit_grpo']})",
        flush=True,
    )
    uvicorn_server(service).run(sockets=[sock])
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`python -m metergate.simulator --port 9001`: a simulated provider on its own (benchmarks, manual tests)."""

from __future__ import annotations

import argparse

import uvicorn

from metergate.simulator import DEFAULT_KEYS, SimulatedProvider, simulator_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--no-auth", action="store_true", help="accept any provider credential")
    args = parser.parse_args()
    app = SimulatedProvider(None if args.no_auth else DEFAULT_KEYS, max_bills=10_000)
    import uvloop

    uvloop.run(uvicorn.Server(simulator_config(app, args.host, args.port)).serve())


if __name__ == "__main__":
    main()

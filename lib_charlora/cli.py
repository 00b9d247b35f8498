"""Command line: ``python -m lib_charlora demo``."""
import argparse
import sys

from .engine.errors import CharLoraError


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lib_charlora", description="Character LoRA trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train on a tiny embedded model and generated pictures (no downloads)")
    demo.add_argument("--out", default="charlora_demo", help="output folder (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default: %(default)s)")
    demo.add_argument("--images", type=int, default=12, help="generated pictures (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo
            run_demo(args.out, steps=args.steps, images=args.images)
    except CharLoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

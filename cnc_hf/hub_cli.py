"""The command line for publishing: `cnc-hf push` and `cnc-hf card`.

    cnc-hf push MODEL_DIR REPO_ID [--private] [--token T] [--dry_run] [--space ORG/NAME]
    cnc-hf card MODEL_DIR [--dataset mvtec] [--example_image part.png]
    python -m cnc_hf.hub_cli push|card ...            (the same; `python -m cnc_hf.hub` still works)

A front for `cnc_hf.hub.upload_model_dir`, `cnc_hf.model_card.write_model_card` and
`cnc_hf.space.push_space`; it is the only module that needs all three.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from cnc_hf.hub import DEFAULT_COMMIT_MESSAGE, HubUnreachableError, upload_model_dir
from cnc_hf.model_card import write_model_card


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnc-hf", description="Publish CNC models on the Hugging Face Hub.")
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="validate a finished model dir, refresh its card, upload it")
    push.add_argument("model_dir", help="the output dir of training (model.safetensors, config.json, code, ...)")
    push.add_argument("repo_id", help="the Hub repo, e.g. org/cnc-mvtec")
    push.add_argument("--private", action="store_true", help="create the repo as private (a new repo only)")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login)")
    push.add_argument("--commit_message", default=DEFAULT_COMMIT_MESSAGE)
    push.add_argument("--create_pr", action="store_true", help="open a pull request instead of committing to main")
    push.add_argument("--card_template", default=None, help="mvtec, visa, generic or a template path")
    push.add_argument("--dataset_id", default=None,
                      help="the Hub dataset id of the training data, for the card's `datasets:` metadata")
    push.add_argument("--dry_run", action="store_true",
                      help="validate the folder and render the card in memory; list the files; write and upload nothing")
    push.add_argument("--space", default=None, metavar="SPACE_ID",
                      help="also create/update a Gradio Space (org/name) that loads REPO_ID (see cnc_hf.space)")
    card = commands.add_parser("card", help="(re)write README.md of a model dir from a template")
    card.add_argument("model_dir")
    card.add_argument("--dataset", default=None, help="mvtec, visa or anything else (generic card)")
    card.add_argument("--template", default=None)
    card.add_argument("--repo_id", default=None)
    card.add_argument("--dataset_id", default=None, help="the Hub dataset id of the training data")
    card.add_argument("--example_image", default=None, help="an image for the heat-map example")
    return parser


def _push(args: argparse.Namespace) -> None:
    result = upload_model_dir(args.model_dir, args.repo_id, private=args.private, token=args.token,
                              commit_message=args.commit_message, create_pr=args.create_pr,
                              card_template=args.card_template, dry_run=args.dry_run, dataset_id=args.dataset_id)
    if args.dry_run:
        print(f"dry run: would upload {len(result)} files to {args.repo_id}:")
        print("\n".join(f"  {name}" for name in result))
    else:
        print(f"uploaded to {getattr(result, 'pr_url', None) or getattr(result, 'commit_url', result)}")
    if args.space:
        from cnc_hf.space import push_space

        space = push_space(args.repo_id, args.space, token=args.token, private=args.private, dry_run=args.dry_run)
        print(f"dry run: would upload {len(space)} files to Space {args.space}: {', '.join(space)}" if args.dry_run
              else f"Space: https://huggingface.co/spaces/{args.space}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "card":
            path = write_model_card(args.model_dir, dataset=args.dataset, template=args.template, repo_id=args.repo_id,
                                    example_image=args.example_image, dataset_id=args.dataset_id)
            print(f"wrote {path}")
        else:
            _push(args)
    except HubUnreachableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``feedback``: report the true label of an earlier prediction (online accuracy)."""

from __future__ import annotations

import argparse
import json

from edgeagent.cli.infer_cmd import add_socket_arg

EPILOG = """\
examples:
  edgeagent infer --input digit.npy            # prints the reply, with its "id"
  edgeagent feedback 3f2a9c1e-1b 7             # that prediction's true class was 7
  edgeagent feedback 3f2a9c1e-1c 7 1 4         # a batch of three: one label per sample

The agent keeps the last 4096 predictions; an older id answers unknown_prediction.
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "feedback",
        help="report the true label(s) of a prediction, for online accuracy",
        description=(
            "Tell the agent the true class of an earlier prediction (by the id its reply carried); "
            "the agent counts it as online accuracy for the model version that made the prediction "
            "and prints which samples were right."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("id", help="the prediction id (the 'id' that infer prints)")
    parser.add_argument("labels", nargs="+", type=int, metavar="LABEL", help="class index, one per sample")
    add_socket_arg(parser)
    parser.set_defaults(handler=_feedback)


def _feedback(args: argparse.Namespace) -> int:
    from edgeagent.client import Client

    labels: int | list[int] = args.labels[0] if len(args.labels) == 1 else args.labels
    with Client(args.socket) as client:
        print(json.dumps(client.feedback(args.id, labels)))
    return 0

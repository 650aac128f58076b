"""Commands that deploy a model: serve (web service and page), export (ONNX), ensemble."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import covidscan.cli.common as common


def cmd_serve(args) -> int:
    import uvicorn

    from covidscan.inference import Predictor
    from covidscan.serve import create_app
    from covidscan.serve.middleware import quiet_tokens_in_access_log
    from covidscan.serve.policy import check_exposure, check_limits, pending_within_budget
    from covidscan.serve.protocol import header_timeout_protocol

    token = args.token or os.environ.get("COVIDSCAN_TOKEN") or None
    hosts = check_exposure(args.host, token)
    check_limits(max_upload_mb=args.max_upload_mb, max_study_mb=args.max_study_mb, max_pending=args.max_pending)
    if args.checkpoint is None:  # neither --checkpoint nor --model: the recommended X-ray model of the zoo
        from covidscan.zoo import DEFAULT_MODEL, checkpoint_path

        args.checkpoint = checkpoint_path(DEFAULT_MODEL["xray"])
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, backend=args.backend)
    pending, why = pending_within_budget(args.max_pending, args.memory_budget, studies=predictor.task == "ct")
    print(f"covidscan serve: {why}", file=sys.stderr)
    app = create_app(
        predictor, max_upload_bytes=args.max_upload_mb * 1024 * 1024, max_pending=pending, token=token,
        max_study_bytes=args.max_study_mb * 1024 * 1024, body_timeout=args.body_timeout, allowed_hosts=hosts,
    )  # fmt: skip
    quiet_tokens_in_access_log()
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", http=header_timeout_protocol(args.header_timeout))
    return 0


def cmd_export(args) -> int:
    from covidscan.export import export_checkpoint

    diff = export_checkpoint(args.checkpoint, args.onnx, opset=args.opset)
    print(f"wrote {args.onnx}; max |onnxruntime - pytorch| = {diff:.2e} on a random batch")
    return 0


def cmd_ensemble(args) -> int:
    from covidscan.ensemble import make_ensemble

    meta = make_ensemble(args.checkpoints, args.out)
    print(f"{meta.extra['description']}; wrote {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="web API and upload page (FastAPI); with neither --checkpoint nor --model: the zoo's xray model"
    )
    common.add_checkpoint(p, required=False)
    p.add_argument(
        "--host", default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; any other needs --token)",
    )  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-upload-mb", type=int, default=20, help="largest accepted upload in megabytes (positive)")
    p.add_argument("--max-study-mb", type=int, default=300, help="CT models: largest zipped series / NIfTI upload in megabytes")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds an upload may stall before 408")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds a client has to send its request headers")
    p.add_argument("--max-pending", type=int, default=8, help="predictions running or waiting at once; more get 503")
    p.add_argument(
        "--memory-budget", type=int, default=None, metavar="MB",
        help="memory the predictions in flight may take at their decode budgets (default: half of this machine's); "
        "--max-pending is lowered to fit it",
    )  # fmt: skip
    p.add_argument(
        "--token", help="require this token (Authorization: Bearer TOKEN); needed beyond localhost (or COVIDSCAN_TOKEN)"
    )
    common.add_device(p)
    common.add_backend(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="ONNX export, checked against PyTorch with onnxruntime")
    common.add_checkpoint(p)
    p.add_argument("--onnx", type=Path, required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("ensemble", help="average several checkpoints' probabilities; writes one checkpoint")
    p.add_argument(
        "checkpoints", type=Path, nargs="+", help="member checkpoints (same task and preprocessing; input sizes may differ)"
    )
    common.add_out(p, "ensemble checkpoint to write")
    p.set_defaults(func=cmd_ensemble)

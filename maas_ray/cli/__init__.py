"""The ``maas`` command line: train, manage the registry and API keys, run the quickstart.

Errors print one line and exit 1; ``--verbose`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Collection, Optional

from pydantic import BaseModel

from maas_ray.errors import ConfigError, MaasError

logger = logging.getLogger("maas_ray.cli")


def _add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], skip: Collection[str] = ()) -> None:
    """One --flag per config field (but ``skip``), parsed by the model itself (lists are comma-separated)."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=None, metavar="VALUE", help=field.description
        )


def _flag_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    out = {}
    for name, field in model.model_fields.items():
        raw = getattr(args, name, None)
        if raw is None:
            continue
        is_list = "list" in str(field.annotation)
        out[name] = [v.strip() for v in raw.split(",") if v.strip()] if is_list else raw
    return out


def ray_console_options(verbose: bool) -> dict[str, Any]:
    """ray.init options: by default the console shows only our lines (the per-epoch ones come
    from the driver); ``--verbose`` restores Ray's own logs and every worker's output."""
    if verbose:
        return {"logging_level": logging.INFO, "log_to_driver": True}
    return {"logging_level": logging.ERROR, "log_to_driver": False}


def _registry(args: argparse.Namespace):
    from maas_ray.registry import Registry

    # --encrypt / --kek / --sign-key exist on the commands that publish (_add_artifact_flags)
    return Registry(args.registry, kek_uri=getattr(args, "kek", None), encrypt=getattr(args, "encrypt", False),
                    signing_key=getattr(args, "sign_key", None))


def _add_artifact_flags(parser: argparse.ArgumentParser) -> None:
    """Encrypt and sign what the command publishes (docs/security.md)."""
    parser.add_argument("--encrypt", action="store_true",
                        help="Store the version's files AES-256-GCM encrypted (needs a KEK: --kek or $MAAS_KEK_URI).")
    parser.add_argument("--kek", default=None, metavar="URI",
                        help="Key-encryption key: file:///path/kek.key or env:NAME (default $MAAS_KEK_URI).")
    parser.add_argument("--sign-key", default=None, metavar="URI",
                        help="Ed25519 private key to sign the manifest (default $MAAS_SIGNING_KEY; unsigned if neither).")


def cmd_train(args: argparse.Namespace) -> int:
    import ray

    from maas_ray.runtime import quick_train_reports
    from maas_ray.train.lm.config import is_lm_config
    from maas_ray.train.tabular import is_tabular_config

    if is_lm_config(args.config, args.model, args.kind):  # `model: decoder-lm` or `kind: generative` (docs/generative.md)
        quick_train_reports()
        return _train_lm(args)
    if is_tabular_config(args.config):  # `kind: tabular`: trees / scikit-learn (docs/tabular.md)
        quick_train_reports()
        return _train_tabular(args)
    from maas_ray.train import TrainConfig, train_and_publish
    from maas_ray.train.pipeline import format_epoch

    cfg = TrainConfig.load(args.config, **_flag_values(args, TrainConfig))
    quick_train_reports()  # before Ray starts: Train workers inherit it
    if not args.verbose:  # Ray Data's driver-side progress report is not ours to print
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        # Ray starts only once the spec and the data passed their checks.
        report = train_and_publish(
            cfg, _registry(args), on_epoch=lambda m: print(format_epoch(m), flush=True),
            ray_init={"address": args.address, **ray_console_options(args.verbose)},
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
    m = report.manifest
    print(
        f"published {m.model}:{m.version}  val_accuracy={report.val_accuracy:.4f} (epoch {report.best_epoch + 1})  "
        f"test_accuracy={report.test_accuracy:.4f}  "
        f"parity_max_abs_diff={report.parity_max_abs_diff:.2e}  "
        f"mean_epoch={report.mean_epoch_seconds:.2f}s  wall={report.wall_seconds:.1f}s"
    )
    return 0


def _train_lm(args: argparse.Namespace) -> int:
    import ray

    from maas_ray.train.lm.config import LMTrainConfig
    from maas_ray.train.lm.pipeline import format_lm_epoch, train_and_publish_lm

    cfg = LMTrainConfig.load(args.config, **_flag_values(args, LMTrainConfig))
    try:
        report = train_and_publish_lm(
            cfg, _registry(args), on_epoch=lambda m: print(format_lm_epoch(m), flush=True),
            ray_init={"address": args.address, **ray_console_options(args.verbose)},
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
    for prompt, text in report.samples.items():
        print(f"sample  {prompt!r} -> {text!r}")
    if report.scores:
        print("reference rules on held-out prompts: " + "  ".join(f"{k}={v:.3f}" for k, v in report.scores.items()))
    m = report.manifest
    print(
        f"published {m.model}:{m.version} (kind {m.kind})  val_perplexity={report.val_perplexity:.3f} "
        f"(epoch {report.best_epoch + 1})  test_perplexity={report.test_perplexity:.3f}  "
        f"parity_max_abs_diff={report.parity_max_abs_diff:.2e}  export={report.export_seconds:.1f}s  wall={report.wall_seconds:.1f}s"
    )
    return 0


def _train_tabular(args: argparse.Namespace) -> int:
    import ray

    from maas_ray.train.tabular import TabularTrainConfig, train_tabular

    cfg = TabularTrainConfig.load(args.config, **_flag_values(args, TabularTrainConfig))
    if not args.verbose:  # Ray Data's progress report is not ours to print (set after its import)
        import ray.data

        logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        report = train_tabular(
            cfg, _registry(args), on_progress=lambda line: print(line, flush=True),
            ray_init={"address": args.address, **ray_console_options(args.verbose)},
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
    m = report.manifest
    scores = "  ".join(f"{k}={v:.4g}" for k, v in report.metrics.items() if k.startswith("test_"))
    print(f"published {m.model}:{m.version}  {scores}  parity_max_abs_diff={report.parity_max_abs_diff:.2e}  "
          f"wall={report.wall_seconds:.1f}s")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    reg = _registry(args)
    if args.models_cmd == "list":
        if args.model:
            aliases = reg.aliases(args.model)
            for v in reg.list_versions(args.model):
                m = reg.describe(args.model, v)
                tags = ",".join(a for a, av in aliases.items() if av == v)
                acc = m.metrics.get("test_accuracy")
                print(f"{m.model}:{v}\t{m.created_at:%Y-%m-%d %H:%M}\t"
                      f"{'acc=%.4f' % acc if acc is not None else '-'}\t{tags}")
        else:
            for name in reg.list_models():
                versions = reg.list_versions(name)
                print(f"{name}\tversions={len(versions)}\tlatest={versions[-1]}\taliases={reg.aliases(name)}")
    elif args.models_cmd == "describe":
        print(reg.describe(args.model, args.version).model_dump_json(indent=2))
    elif args.models_cmd == "publish":
        from maas_ray.registry import ProcessorSpec

        def spec(name: str, params: Optional[str]) -> ProcessorSpec:
            return ProcessorSpec(name=name, params=json.loads(params) if params else {})

        generative: dict[str, Any] = {}
        if args.tokenizer:  # a decoder LM exported elsewhere: the KV layout is read from the graph
            from maas_ray.registry import ExtraFile
            from maas_ray.registry.kv_layout import generation_spec_from_graph

            if args.context_length is None:
                raise ConfigError("--tokenizer publishes a generative version: give --context-length too")
            with open(args.onnx_file, "rb") as f, open(args.tokenizer, "rb") as t:
                graph, tokenizer = f.read(), t.read()
            template = None
            if args.chat_template:
                with open(args.chat_template, encoding="utf-8") as c:
                    template = c.read()
            generative = {
                "generation": generation_spec_from_graph(
                    graph, tokenizer, context_length=args.context_length, eos_token=args.eos_token,
                    bos_token=args.bos_token, chat_template=template),
                "files": {"tokenizer.json": ExtraFile(tokenizer, role="tokenizer")},
            }
        m = reg.publish(
            args.model,
            args.onnx_file,
            preprocessor=spec(args.preprocessor, args.preprocessor_params),
            postprocessor=spec(args.postprocessor, args.postprocessor_params),
            description=args.description,
            **generative,
        )
        print(f"published {m.model}:{m.version} sha256={m.sha256}"
              f"{'  encrypted (kek ' + m.encryption.kek_id + ')' if m.encryption else ''}")
    elif args.models_cmd == "alias":
        v = reg.set_alias(args.model, args.alias, args.version)
        print(f"{args.model}:{args.alias} -> {v}")
    elif args.models_cmd == "delete":  # refused while an alias or a serving app points at it
        from maas_ray.cli import serving_apps

        v = reg.check_delete(args.model, args.version)  # unknown, or named by an alias: before asking Serve
        serving, why = serving_apps.find_serving(reg, args.model)
        if serving is None:
            print(f"note: serving apps not checked: {why}; only aliases are checked", file=sys.stderr)
        reg.check_delete(args.model, v, serving=serving or {})
        if not args.yes:
            if not sys.stdin.isatty():
                raise ConfigError(f"not deleting {args.model}:{v} without confirmation: stdin is not a terminal; "
                                  "pass --yes")
            if input(f"delete {args.model}:{v}? This cannot be undone. [y/N] ").strip().lower() not in ("y", "yes"):
                print(f"{args.model}:{v} not deleted")
                return 1
        reg.delete_version(args.model, v, serving=serving or {})
        print(f"deleted {args.model}:{v}")
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from maas_ray.errors import ConfigError, format_validation_error
    from maas_ray.optimize import OptimizeConfig, optimize_and_publish

    model, sep, ref = args.ref.partition(":")
    if not sep or not model or not ref:
        raise ConfigError(f"expected MODEL:VERSION (e.g. digits:1 or digits:production), got {args.ref!r}")
    chosen = [m for m, on in (("int8", args.int8), ("fp16", args.fp16), ("graph", args.graph)) if on]
    if len(chosen) != 1:
        raise ConfigError(f"pick exactly one of --int8, --fp16, --graph (got {chosen or 'none'})")
    settings: dict[str, Any] = {"method": chosen[0], "static": args.static}
    for name in ("max_accuracy_drop", "threads", "calibration_size", "max_perplexity_increase", "eval_text"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    try:
        cfg = OptimizeConfig(**settings)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "optimize")) from exc
    r = optimize_and_publish(model, ref, cfg, _registry(args))
    m = r.manifest
    if m.generation is not None:  # a generative version: perplexity and decode speed (docs/rollout.md)
        print(
            f"published {m.model}:{m.version} ({m.description})  "
            f"perplexity {r.parent.perplexity:.4f} -> {r.child.perplexity:.4f} ({r.perplexity_increase:+.2%}) "
            f"on {r.eval_tokens} tokens  decode {r.parent.decode_tokens_per_s:.0f} -> "
            f"{r.child.decode_tokens_per_s:.0f} tokens/s ({r.speedup:.2f}x)  "
            f"size {r.size_ratio:.2f}x ({int(m.metrics['size_bytes'])} bytes)"
        )
        return 0
    print(
        f"published {m.model}:{m.version} ({m.description})  "
        f"accuracy {r.parent.accuracy:.4f} -> {r.child.accuracy:.4f} ({r.accuracy_delta:+.4f})  "
        f"speedup b1 {r.speedup_b1:.2f}x  best batch {r.speedup_best:.2f}x (b{r.child.best_batch})  "
        f"size {r.size_ratio:.2f}x ({m.size_bytes} bytes)"
    )
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from maas_ray.cli.quickstart import run_quickstart

    return run_quickstart(registry_root=args.registry, epochs=args.epochs, model=args.model, verbose=args.verbose, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    from maas_ray.train import TrainConfig
    from maas_ray.train.lm.config import LMTrainConfig

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None, help="Registry root (default $MAAS_REGISTRY_ROOT or ~/.maas_ray/registry).")
    common.add_argument("-v", "--verbose", action="store_true", help="Debug logs and tracebacks.")

    parser = argparse.ArgumentParser(prog="maas", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", parents=[common], help="Train with Ray Train (DDP, or trees), export, publish.")
    p.add_argument("--config", help="TrainConfig YAML, e.g. deployments/train/digits.yaml; one with `kind: tabular` "
                   "trains trees or scikit-learn (deployments/train/tabular-*.yaml, docs/tabular.md).")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start or join a local one).")
    _add_model_flags(p, TrainConfig)
    _add_model_flags(p, LMTrainConfig, skip=TrainConfig.model_fields)  # `--model decoder-lm` only
    _add_artifact_flags(p)
    p.set_defaults(func=cmd_train)

    models = sub.add_parser("models", help="Inspect and manage the model registry.")
    msub = models.add_subparsers(dest="models_cmd", required=True)
    p = msub.add_parser("list", parents=[common], help="List models, or the versions of one.")
    p.add_argument("model", nargs="?")
    p = msub.add_parser("describe", parents=[common], help="Print a version's manifest.")
    p.add_argument("model")
    p.add_argument("version", nargs="?", default=None, help="Version or alias (default: latest).")
    p = msub.add_parser("publish", parents=[common], help="Publish any .onnx file as a new version.")
    p.add_argument("model")
    p.add_argument("onnx_file")
    p.add_argument("--preprocessor", default="tensor")
    p.add_argument("--preprocessor-params", default=None, help="JSON object.")
    p.add_argument("--postprocessor", default="tensor")
    p.add_argument("--postprocessor-params", default=None, help="JSON object.")
    p.add_argument("--description", default="")
    p.add_argument("--tokenizer", default=None, help="A generative (decoder LM) graph's tokenizer.json: publishes "
                   "kind: generative, the KV-cache layout read from the graph (docs/generative.md).")
    p.add_argument("--context-length", type=int, default=None, help="With --tokenizer: most tokens per sequence.")
    p.add_argument("--eos-token", default=None, help="With --tokenizer: the end-of-sequence special token "
                   "(default: <|endoftext|>, </s>, ... whichever the tokenizer has).")
    p.add_argument("--bos-token", default=None, help="With --tokenizer: a special token prepended to prompts.")
    p.add_argument("--chat-template", default=None, help="With --tokenizer: a Jinja chat template file.")
    _add_artifact_flags(p)
    p = msub.add_parser("alias", parents=[common], help="Point an alias (e.g. production) at a version.")
    p.add_argument("model")
    p.add_argument("alias")
    p.add_argument("version")
    p = msub.add_parser("delete", parents=[common], help="Delete a version; refused while an alias or a serving "
                        "app (read from the Ray dashboard, $RAY_DASHBOARD_ADDRESS / $RAY_ADDRESS) points at it.")
    p.add_argument("model")
    p.add_argument("version", help="The version number (not an alias).")
    p.add_argument("--yes", action="store_true", help="Delete without asking (needed when stdin is not a terminal).")
    for p in msub.choices.values():
        p.set_defaults(func=cmd_models)

    from maas_ray.cli.keys import add_keys_parser

    add_keys_parser(sub, common)

    from maas_ray.cli.audit import add_audit_parser

    add_audit_parser(sub, common)

    from maas_ray.cli.tls_front import add_tls_front_parser

    add_tls_front_parser(sub, common)

    from maas_ray.cli.rollout import add_rollout_parser

    add_rollout_parser(sub, common)

    from maas_ray.batch.cli import add_batch_parser

    add_batch_parser(sub, common, ray_console_options)

    p = sub.add_parser("optimize", parents=[common], help="Publish an INT8 / FP16 / graph-optimized version of a version.")
    p.add_argument("ref", help="MODEL:VERSION (a number or an alias), e.g. digits:1.")
    p.add_argument("--int8", action="store_true", help="INT8 quantization (dynamic unless --static).")
    p.add_argument("--static", action="store_true", help="With --int8: static, calibrated on the validation split.")
    p.add_argument("--fp16", action="store_true", help="Float16 weights and compute, FP32 inputs/outputs.")
    p.add_argument("--graph", action="store_true", help="onnxruntime offline graph optimization.")
    p.add_argument("--max-accuracy-drop", type=float, default=None, help="Refuse to publish above this drop (default 0.01).")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads for the timings (default 1).")
    p.add_argument("--calibration-size", type=int, default=None, help="--static: validation rows (default 200).")
    p.add_argument("--max-perplexity-increase", type=float, default=None, help="Generative versions: refuse to "
                   "publish above this relative perplexity increase (default 0.02 = 2 %%).")
    p.add_argument("--eval-text", default=None, metavar="FILE", help="Generative versions: held-out text to measure "
                   "perplexity on (default: the test split of the version's recorded training data).")
    _add_artifact_flags(p)  # an encrypted parent's child is encrypted whether or not --encrypt is given
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("quickstart", parents=[common], help="Train, publish, serve and query a model end to end.")
    p.add_argument("--model", choices=["digits", "cnn", "text", "lm"], default="digits",
                   help="digits (MLP, the default), cnn (digit images, served from PNG), text (transformer, raw "
                        "text) or lm (a language model: streamed completions, OpenAI routes).")
    p.add_argument("--epochs", type=int, default=None, help="Default: the model's training YAML.")
    p.add_argument("--port", type=int, default=8000, help="Serve's HTTP port (the app YAML says 8000).")
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        # Commands print their own results; library INFO logs are for --verbose.
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except MaasError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

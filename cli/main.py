"""`llamagen`: the one command-line entry point, the top layer. Subcommands call into the
packages below (model_registry, engine, server, bench).

User errors (bad flags, unknown models, missing files, mismatched checkpoints) end with one
line on stderr and exit status 2, before any engine starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr, ValidationError

from engine.credentials import SigningError
from engine.settings import KVCacheDType
from model_registry.checkpoint import CheckpointError
from model_registry.configs import ConfigError
from model_registry.model_dir import load_model_dir
from model_registry.text_encoder import DEFAULT_TEXT_ENCODER
from server.image_store import StoreUnavailable


class UsageError(ValueError):
    """Bad command-line input."""


class EngineDied(RuntimeError):
    """The server stopped because an engine core died (exit status 3, for a restart)."""


# ---- flags generated from pydantic models (one definition for flags, env vars and docs) ----

def _field_type(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def _parse_secret(text: str) -> SecretStr:
    return SecretStr(text)


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel],
                    exclude: Sequence[str] = ()) -> None:
    """One `--flag` per field of `model`, defaulting to None so that unset flags keep the
    model's own defaults."""
    group = parser.add_argument_group(model.__name__)
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        kind = _field_type(field.annotation)
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description or ''} (default: {default})".strip()
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               default=None,
                               help=help_text)
        elif typing.get_origin(kind) is typing.Literal:
            values = typing.get_args(kind)
            group.add_argument(flag, dest=name, choices=values, default=None,
                               type=type(values[0]),
                               help=help_text)
        elif typing.get_origin(kind) is list:
            group.add_argument(flag, dest=name, nargs="+", type=typing.get_args(kind)[0],
                               default=None, help=help_text)
        elif kind is SecretStr:
            group.add_argument(flag, dest=name, type=_parse_secret, default=None,
                               help=f"{field.description or ''} (default: none)")
        else:
            group.add_argument(flag, dest=name, type=kind, default=None, help=help_text)


def model_from_flags(model: type[BaseModel], args: argparse.Namespace) -> Any:
    values = {k: getattr(args, k) for k in model.model_fields
              if getattr(args, k, None) is not None}
    return model(**values)


def _one_line(e: ValidationError) -> str:
    """Each error as `--flag: why` (a rule between flags: just why)."""
    def one(err: Any) -> str:
        msg = str(err["msg"]).removeprefix("Value error, ")
        flag = ".".join(map(str, err["loc"])).replace("_", "-")
        return f"--{flag}: {msg}" if flag else msg

    return "; ".join(one(err) for err in e.errors())


# ---- subcommands ----

def cmd_models(args: argparse.Namespace) -> None:
    from model_registry.configs import GPT_MODELS, RELEASES, resolve_gpt_config
    from vq_decoder.vq_model import VQ_MODELS

    print("GPT models (c2i parameter counts at 256 px):")
    for name in GPT_MODELS:
        cfg = resolve_gpt_config(name, image_size=256)
        print(f"  {name:9s} layers {cfg.n_layer:2d}  heads {cfg.n_head:2d}  dim {cfg.dim:4d}  "
              f"head_dim {cfg.head_dim:3d}  ffn {cfg.ffn_hidden:5d}  "
              f"params {_gpt_params(cfg):>13,}")
    print("VQ tokenizers:")
    for name, vq in VQ_MODELS.items():
        print(f"  {name:9s} codebook {vq.codebook_size} x {vq.codebook_embed_dim}  "
              f"downsample {vq.downsample}  ch_mult {list(vq.decoder_ch_mult)}")
    print("Released checkpoints (llamagen convert --gpt-checkpoint FILE ...):")
    for key, r in RELEASES.items():
        print(f"  {r.filename:22s} {r.gpt_model:8s} {r.model_type} {r.image_size} px  "
              f"VQ {r.vq_filename}  hub {r.repo_id}" + ("  (FSDP)" if r.from_fsdp else ""))
        del key


def _gpt_params(cfg: Any) -> int:
    import torch

    from model_registry.gpt import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return sum(p.numel() for p in model.parameters())


def _checkpoint_path(spec: str, vq: bool = False) -> Path:
    """A local file, or a released file name fetched through the hub cache."""
    from model_registry.checkpoint import hub_download
    from model_registry.configs import RELEASES, VQ_RELEASES

    path = Path(spec)
    if path.is_file():
        return path
    name = path.name
    if vq and name in VQ_RELEASES:
        return hub_download(VQ_RELEASES[name][1], name)
    release = RELEASES.get(name.removesuffix(".pt"))
    if not vq and release is not None:
        return hub_download(release.repo_id, release.filename)
    raise CheckpointError(f"checkpoint not found: {spec}")


def cmd_convert(args: argparse.Namespace) -> None:
    from model_registry.convert import convert

    gpt_ckpt = _checkpoint_path(args.gpt_checkpoint)
    vq_ckpt = _checkpoint_path(args.vq_checkpoint, vq=True) if args.vq_checkpoint else None
    model = convert(gpt_ckpt, args.gpt_model, args.out, image_size=args.image_size,
                    vq_checkpoint=vq_ckpt, vq_model=args.vq_model,
                    class_names=args.class_names, text_encoder=args.text_encoder,
                    name=args.name, overwrite=args.overwrite)
    print(f"wrote {model.path}: {model.gpt.model_type} {model.image_size}px, "
          f"{model.grid_size}x{model.grid_size} tokens, "
          f"{'with' if model.vq else 'without'} VQ decoder"
          + (f", text encoder {model.text_encoder['name_or_path']}" if model.text_encoder
             else ", no text encoder (caption features only)" if model.is_t2i else ""))


def cmd_generate(args: argparse.Namespace) -> None:
    from engine.conditions import Condition
    from engine.credentials import ContentCredentials, SigningSettings
    from engine.images import ImageWriter
    from engine.offline import OfflineGenerator
    from engine.sampling import SamplingOptions
    from engine.settings import EngineSettings
    from engine.vllm_api import build_llm

    try:
        settings = model_from_flags(EngineSettings, args)
        signing = model_from_flags(SigningSettings, args)
        given = model_from_flags(SamplingOptions, args).model_dump(exclude_unset=True)
    except ValidationError as e:
        raise UsageError(_one_line(e)) from None
    model = load_model_dir(resolve_model_path(args.model))
    options = SamplingOptions.resolve(model.gpt.model_type, **given)
    if model.is_t2i != bool(args.prompts) or bool(args.labels) == bool(args.prompts):
        raise UsageError(f"{model.name} is {'text' if model.is_t2i else 'class'}-conditional: "
                         f"give {'--prompts' if model.is_t2i else '--labels'}")
    if model.is_t2i and any(not text.strip() for text in args.prompts):
        raise UsageError("--prompts: a prompt must not be empty")
    labels = [] if model.is_t2i else [model.resolve_label(text) for text in args.labels]
    count = len(args.prompts or args.labels)
    negatives = negative_texts(args, count, options)
    negative_labels = (None if negatives is None or model.is_t2i
                       else [model.resolve_label(text) for text in negatives])
    if not args.tokens_out and not args.out_dir:
        raise UsageError("nothing to write: give --tokens-out FILE and/or --out-dir DIR")
    if args.out_dir and model.vq is None:
        raise UsageError(f"{model.path} has no VQ decoder: use --tokens-out only")
    prefixes = read_prefixes(model, args.prefix_tokens, len(args.prompts or args.labels))
    adapter = None
    if args.lora:
        from engine.adapters import offline_adapter
        from model_registry.lora import AdapterError

        try:
            adapter = offline_adapter(model, args.lora, settings.max_lora_rank)
        except AdapterError as e:
            raise UsageError(f"--lora: {e}") from None
        settings = settings.model_copy(update={"enable_lora": True})
    generator = OfflineGenerator(model, build_llm(model, settings))
    conditions = (generator.captions(args.prompts) if model.is_t2i
                  else [Condition(label=label) for label in labels])
    if negatives is not None:
        negative = (generator.captions(negatives) if negative_labels is None
                    else [Condition(label=label) for label in negative_labels])
        conditions = [c.with_negative(n) for c, n in zip(conditions, negative, strict=True)]
    tokens, seeds = generator.generate(conditions, options, prefixes, adapter)
    if args.tokens_out:
        Path(args.tokens_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.tokens_out).write_text(json.dumps(tokens))
    images = []
    if args.out_dir:
        writer = ImageWriter(model, options, args.format, args.compression,
                             ContentCredentials.from_settings(signing),
                             adapter=None if adapter is None else adapter.describe())
        images = writer.save(tokens, conditions, seeds, Path(args.out_dir), prefixes=prefixes)
    described = ({"prompts": [c.caption for c in conditions]} if model.is_t2i
                 else {"labels": labels})
    print(json.dumps({**described, "seeds": None if all(s is None for s in seeds) else seeds,
                      "tokens_out": args.tokens_out, "images": [str(p) for p in images]}))


def cmd_sample(args: argparse.Namespace) -> None:
    from engine.sampling import SamplingOptions
    from engine.settings import EngineSettings
    from jobs.job import InputError, SampleJob, batch_items, caption_items, class_items, digest
    from jobs.outputs import open_output
    from jobs.run import Execution, RunMismatch, run

    try:
        settings = model_from_flags(EngineSettings, args)
        given = model_from_flags(SamplingOptions, args).model_dump(exclude_unset=True)
        execution = Execution(actors=args.actors, address=args.address,
                              cpus_per_actor=args.cpus_per_actor,
                              gpus_per_actor=args.gpus_per_actor,
                              endpoint_url=args.store_endpoint, merge=args.merge,
                              verbose=args.verbose)
    except ValidationError as e:
        raise UsageError(_one_line(e)) from None
    seed = given.pop("seed", None)
    model = load_model_dir(resolve_model_path(args.model))
    SamplingOptions.resolve(model.gpt.model_type, **given)  # a bad combination fails here
    sources = [name for name, value in (("--num-samples", args.num_samples),
                                        ("--label-file", args.label_file),
                                        ("--caption-file", args.caption_file),
                                        ("--batch-input", args.batch_input)) if value]
    if len(sources) != 1:
        raise UsageError("give one input: --num-samples N or --label-file FILE (class "
                         "models), --caption-file FILE (text models), or --batch-input FILE")
    if model.vq is None:
        raise UsageError(f"{model.path} has no VQ decoder: sample writes pixels")
    wanted_t2i = {"--caption-file": True, "--batch-input": model.is_t2i}.get(sources[0], False)
    if wanted_t2i != model.is_t2i:
        raise UsageError(f"{model.name} is {'text' if model.is_t2i else 'class'}-conditional: "
                         f"give {'--caption-file' if model.is_t2i else '--num-samples or '}"
                         f"{'' if model.is_t2i else '--label-file'}")
    if args.num_samples is not None and args.num_samples < 1:
        raise UsageError("--num-samples: at least 1")
    try:
        if args.batch_input:
            kind, items = "batch", batch_items(args.batch_input)
        elif args.caption_file:
            kind, items = "captions", caption_items(args.caption_file)
        else:
            kind, items = "classes", class_items(model, args.num_samples or 0, args.labels,
                                                 seed or 0, args.label_file)
        output = open_output(args.out, args.store_endpoint)
    except (InputError, ValueError) as e:
        raise UsageError(str(e)) from None
    job = SampleJob(kind=kind, model=str(model.path.resolve()), model_sha256=model.gpt_sha256,
                    served_names=args.served_model_name or [model.name], seed=seed or 0,
                    sampling=given, engine=settings.model_dump(), outputs=args.outputs,
                    image_format=args.format, compression=args.compression,
                    shard_size=args.shard_size, decode_batch=args.decode_batch,
                    items=len(items), items_sha256=digest(items))
    try:
        summary = run(job, items, output, execution)
    except RunMismatch as e:
        raise UsageError(str(e)) from None
    print(json.dumps(summary))


def negative_texts(args: argparse.Namespace, count: int, options: Any) -> list[str] | None:
    """--negative-prompt (every image) or --negative-prompts (one per image), checked."""
    if args.negative_prompt is not None and args.negative_prompts is not None:
        raise UsageError("give --negative-prompt (every image) or --negative-prompts (one per "
                         "image), not both")
    negatives = ([args.negative_prompt] * count if args.negative_prompt is not None
                 else args.negative_prompts)
    if negatives is None:
        return None
    if len(negatives) != count:
        raise UsageError(f"--negative-prompts: {len(negatives)} for {count} images; give one "
                         "per image")
    if any(not text.strip() for text in negatives):
        raise UsageError("--negative-prompt(s): a negative prompt must not be empty")
    if options.cfg_scale <= 1:
        raise UsageError(f"--negative-prompt(s) steer guidance, and --cfg-scale is "
                         f"{options.cfg_scale:g}: give --cfg-scale > 1")
    return negatives


def read_prefixes(model: Any, path: str | None, count: int) -> list[list[int]] | None:
    """--prefix-tokens FILE: a JSON list of token lists, one per label or prompt."""
    from engine.conditions import check_prefix

    if path is None:
        return None
    try:
        prefixes = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--prefix-tokens {path}: {e}") from None
    if not isinstance(prefixes, list) or not all(isinstance(p, list) for p in prefixes):
        raise UsageError(f"--prefix-tokens {path}: expected a JSON list of token lists")
    if len(prefixes) != count:
        raise UsageError(f"--prefix-tokens {path}: {len(prefixes)} lists for {count} images; "
                         "give one per label or prompt")
    try:
        return [check_prefix(model, p) for p in prefixes]
    except ValueError as e:
        raise UsageError(f"--prefix-tokens {path}: {e}") from None


def resolve_model_path(model: str | Path | None) -> Path:
    """The given model directory, else the embedded demo model."""
    from model_registry.demo import DEMO_MODEL

    if model:
        return Path(model)
    if (DEMO_MODEL / "config.json").is_file():
        return DEMO_MODEL
    raise UsageError(f"no --model given and the demo model is missing at {DEMO_MODEL} "
                     "(make it with `llamagen train-demo`)")


def cmd_train_demo(args: argparse.Namespace) -> None:
    import tempfile

    from model_registry.demo import DEMO_MODEL
    from model_registry.demo.train import TrainSettings, train_demo

    settings = TrainSettings.smoke() if args.smoke else TrainSettings(seed=args.seed)
    out = Path(args.out) if args.out else DEMO_MODEL
    with tempfile.TemporaryDirectory(prefix="llamagen-train-") as work:
        train_demo(out, Path(args.work or work), settings)


def cmd_train_lora(args: argparse.Namespace) -> None:
    from model_registry.demo.train_lora import DEMO_ADAPTER, LoRASettings, train_lora

    settings = LoRASettings.smoke() if args.smoke else LoRASettings(seed=args.seed)
    train_lora(Path(args.out) if args.out else DEMO_ADAPTER, settings,
               resolve_model_path(args.model))


def cmd_eval_demo(args: argparse.Namespace) -> None:
    from bench.demo_eval import evaluate_demo
    from engine.settings import EngineSettings

    settings = EngineSettings(dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
                              enforce_eager=False if args.compiled else None)
    negatives = []
    for pair in args.negative or []:
        name, sep, negative = pair.partition("=")
        if not sep or not name.strip() or not negative.strip():
            raise UsageError(f"--negative {pair!r}: write CLASS=NEGATIVE")
        negatives.append((name, negative))
    report = evaluate_demo(resolve_model_path(args.model), per_class=args.per_class,
                           seed=args.seed, cfg_scale=args.cfg_scale, settings=settings,
                           grid_out=Path(args.grid_out) if args.grid_out else None,
                           negatives=negatives,
                           adapter=Path(args.lora) if args.lora else None)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def cmd_dev_credentials(args: argparse.Namespace) -> None:
    from engine.credentials import make_development_credentials

    chain, key = make_development_credentials(Path(args.out))
    print("UNTRUSTED development credentials: for trials only, no reader trusts them",
          file=sys.stderr)
    print(json.dumps({"cert": str(chain), "key": str(key)}))


def cmd_serve(args: argparse.Namespace) -> None:
    from engine.credentials import ContentCredentials
    from server.app import configure_logging, create_app
    from server.settings import ServerSettings

    try:
        settings = model_from_flags(ServerSettings, args)
    except ValidationError as e:
        raise UsageError(_one_line(e)) from None
    if not settings.model:
        settings.model = [resolve_model_path(None)]
    models = [load_model_dir(path) for path in settings.model]  # fail before any engine starts
    try:
        adapters = settings.adapters(settings.served_names([m.name for m in models]))
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_adapters(models, adapters, settings.max_lora_rank)  # likewise
    configure_logging(settings.log_level)
    credentials = ContentCredentials.from_settings(settings)  # bad keys: fail before it too
    check_image_store(settings)  # a missing bucket or bad credentials: likewise
    app = create_app(settings, credentials)
    run_server(app, settings)
    if app.state.llamagen.engine_dead:
        raise EngineDied(app.state.llamagen.engine_dead)


def check_adapters(models: list[Any], adapters: dict[str, list[tuple[str, Path]]],
                   max_rank: int) -> None:
    """Every --lora-modules adapter is a PEFT LoRA of its base, checked before any engine."""
    from model_registry.lora import AdapterError, check_adapter

    for model in models:
        for name, path in adapters[model.name]:
            try:
                check_adapter(path, model.gpt, max_rank)
            except AdapterError as e:
                raise UsageError(f"--lora-modules {name}: {e}") from None


def check_image_store(settings: Any) -> None:
    import asyncio

    from server.image_store import open_image_store

    if settings.image_store is not None:
        asyncio.run(open_image_store(settings.image_store, settings.image_dir,
                                     settings.image_ttl_s, settings.image_store_endpoint).start())


def run_server(app: Any, settings: Any) -> None:
    """uvicorn, with SIGTERM/SIGINT marking the app as draining (new work gets 503, /ready
    fails) while in-flight requests get up to drain_timeout_s to finish."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.llamagen.draining = True
            super().handle_exit(sig, frame)

    from server.connections import header_deadline_protocol

    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level, access_log=False,
                            timeout_graceful_shutdown=settings.drain_timeout_s,
                            http=header_deadline_protocol(settings.header_timeout_s))
    server = DrainingServer(config)

    def stop() -> None:  # the engine died: drain, then exit (non-zero, see cmd_serve)
        server.should_exit = True

    app.state.llamagen.stop_server = stop
    server.run()


def cmd_bench_offline(args: argparse.Namespace) -> None:
    from bench.offline import run_offline_benchmark

    json_out = args.json_out or f"docs/bench_offline{'' if args.task == 'c2i' else '_t2i'}.json"
    run_offline_benchmark(sizes=args.sizes, batch_sizes=args.batch_sizes, dtype=args.dtype,
                          json_out=Path(json_out), markdown_out=Path(args.markdown_out),
                          task=args.task, kv_cache_dtypes=tuple(args.kv_cache_dtype),
                          modes=tuple(args.modes), image_size=args.image_size)


def cmd_bench_lora(args: argparse.Namespace) -> None:
    from bench.lora import run_lora_benchmark

    json_out = args.json_out or f"docs/bench_lora_{args.model.lower().replace('-', '')}.json"
    run_lora_benchmark(args.model, args.batch, args.dtype, args.rank, args.rounds,
                       Path(json_out), Path(args.markdown_out))


def build_parser() -> argparse.ArgumentParser:
    from bench import decoder as bench_decoder
    from bench import invariance as bench_invariance
    from bench import models as bench_models
    from bench import sample as bench_sample
    from bench import serve as bench_serve
    from bench import signing as bench_signing
    from bench import soak as bench_soak
    from engine.credentials import SigningSettings
    from engine.sampling import SamplingOptions
    from engine.settings import EngineSettings
    from server.settings import ServerSettings
    from vq_decoder.encoding import IMAGE_FORMATS

    parser = argparse.ArgumentParser(prog="llamagen", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the model zoo and released checkpoints")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("convert", help="official checkpoints -> a model directory")
    p.add_argument("--gpt-checkpoint", required=True,
                   help="GPT .pt file (DDP {'model': ...} or bare FSDP), or a released file "
                        "name fetched from the hub cache")
    p.add_argument("--gpt-model", required=True,
                   help="zoo name (GPT-B, ...), a JSON file or inline JSON with ModelArgs "
                        "fields")
    p.add_argument("--image-size", type=int, help="image size in pixels (needed for a zoo "
                   "name; checked against a JSON config)")
    p.add_argument("--vq-checkpoint", help="VQ tokenizer .pt file or released file name")
    p.add_argument("--vq-model", help="VQ-16, VQ-8, a JSON file or inline JSON "
                   "(default: VQ-16)")
    p.add_argument("--class-names", help="`id, name` lines replacing the ImageNet names")
    p.add_argument("--text-encoder", help="t2i: the T5 encoder, a local directory or a hub "
                   f"name (the released t2i models use {DEFAULT_TEXT_ENCODER})")
    p.add_argument("--name", help="served model name (default: the directory name)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate images offline with the vLLM engine")
    p.add_argument("--model", help="model directory")
    p.add_argument("--labels", nargs="+", help="c2i: class ids or names, one image each")
    p.add_argument("--prompts", nargs="+", help="t2i: captions, one image each")
    p.add_argument("--negative-prompt", metavar="TEXT", help="what guidance steers away "
                   "from, for every image: a class id or name (c2i) or a caption (t2i), in "
                   "place of the null condition in the unguided stream (needs --cfg-scale > 1)")
    p.add_argument("--negative-prompts", nargs="+", metavar="TEXT",
                   help="one negative per label or prompt, as --negative-prompt")
    p.add_argument("--lora", metavar="DIR", help="draw with a LoRA adapter: a PEFT adapter "
                   "directory for this model (rank up to --max-lora-rank)")
    p.add_argument("--prefix-tokens", metavar="FILE", help="complete given grids: a JSON list "
                   "of token lists (one per label or prompt), each the first image codes in "
                   "raster order; the output grids include them")
    p.add_argument("--tokens-out", help="write the token ids (one list per image) as JSON")
    p.add_argument("--out-dir", help="write one image per label or prompt: "
                   "{index:04d}_{label}.png (c2i) or {index:04d}.png (t2i)")
    p.add_argument("--format", default="png", choices=list(IMAGE_FORMATS),
                   help="image format for --out-dir (default: png)")
    p.add_argument("--compression", type=int, choices=range(101), metavar="0..100",
                   help="0..100: JPEG/WebP quality is 100 - compression; PNG zlib level")
    add_model_flags(p, SamplingOptions)
    add_model_flags(p, EngineSettings, exclude=("seed",))
    add_model_flags(p, SigningSettings)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sample", help="generate at scale on Ray Data: class or caption runs to "
                       "sharded .npz and/or image files, or an OpenAI Batch file; resumable")
    p.add_argument("--model", help="model directory (on every node of a cluster; default: "
                   "the embedded demo)")
    inputs = p.add_argument_group("input (one of)")
    inputs.add_argument("--num-samples", type=int, metavar="N", help="class models: N samples, "
                        "labels as --labels says")
    inputs.add_argument("--labels", default="uniform", choices=["uniform", "balanced"],
                        help="with --num-samples: drawn uniformly from the run's seed (as the "
                        "original's sampler), or balanced (sample i has class i mod classes)")
    inputs.add_argument("--label-file", metavar="FILE", help="class models: one class id or "
                        "name per line")
    inputs.add_argument("--caption-file", metavar="FILE", help="text models: one caption per "
                        "line, or JSONL with a \"caption\" (or \"prompt\") each")
    inputs.add_argument("--batch-input", metavar="FILE", help="an OpenAI Batch input file "
                        "(/v1/images/generations and /v1/images/edits lines, edits' images as "
                        "data: URLs); writes output.jsonl")
    p.add_argument("--out", required=True, help="a directory or s3://bucket/prefix; a run "
                   "there with the same flags is resumed")
    p.add_argument("--store-endpoint", metavar="URL", help="S3-compatible endpoint for an "
                   "s3:// --out (default: AWS, or AWS_ENDPOINT_URL)")
    p.add_argument("--outputs", nargs="+", default=["npz"], choices=["npz", "images"],
                   help="class and caption runs: sharded .npz (arr_0 uint8 N x H x W x 3, the "
                   "ADM evaluator's layout), image files with provenance, or both")
    p.add_argument("--format", default="png", choices=list(IMAGE_FORMATS),
                   help="image files' format (default: png)")
    p.add_argument("--compression", type=int, choices=range(101), metavar="0..100")
    p.add_argument("--shard-size", type=int, default=250, help="samples (or Batch lines) per "
                   "shard: the unit of work, of output and of resumption (default: 250)")
    p.add_argument("--decode-batch", type=int, default=32, help="VQ decode batch (default: 32)")
    p.add_argument("--merge", action="store_true", help="also write samples.npz: every shard "
                   "in index order, one file (what the ADM evaluator reads)")
    p.add_argument("--served-model-name", nargs="+", metavar="NAME", help="the names a Batch "
                   "line's `model` may give (default: the model's name)")
    ray_flags = p.add_argument_group("Ray")
    ray_flags.add_argument("--actors", type=int, default=1, help="engines (Ray actors), one "
                           "GPU each on a GPU cluster (default: 1)")
    ray_flags.add_argument("--address", help="an existing Ray cluster (ray://host:10001 or "
                           "host:6379); default: a local Ray instance for this run")
    ray_flags.add_argument("--cpus-per-actor", type=float, help="default: the machine's cores "
                           "/ --actors without GPUs, else 1")
    ray_flags.add_argument("--gpus-per-actor", type=float, help="default: "
                           "--tensor-parallel-size where the cluster has GPUs, else 0")
    ray_flags.add_argument("--verbose", action="store_true", help="the actors' logs on stderr")
    add_model_flags(p, SamplingOptions)
    add_model_flags(p, EngineSettings, exclude=("seed",))
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("serve", help="run the HTTP server")
    add_model_flags(p, ServerSettings)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("dev-credentials", help="make an UNTRUSTED development CA and C2PA "
                       "signing certificate (for trials; production uses real ones)")
    p.add_argument("--out", required=True, help="directory for the PEM files")
    p.set_defaults(func=cmd_dev_credentials)

    p = sub.add_parser("train-demo", help="train the embedded demo model (~21 min, 2 cores)")
    p.add_argument("--out", help="model directory to write (default: the embedded demo)")
    p.add_argument("--work", help="keep the official-format checkpoints here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few steps of everything (< 1 min)")
    p.set_defaults(func=cmd_train_demo)

    p = sub.add_parser("train-lora", help="train the demo model's LoRA adapter (dusk "
                       "backgrounds; a few minutes on 2 cores)")
    p.add_argument("--model", help="the base model directory (default: the embedded demo)")
    p.add_argument("--out", help="adapter directory to write (default: the shipped one, "
                   "model_registry/demo/adapters/dusk)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few steps (seconds)")
    p.set_defaults(func=cmd_train_lora)

    p = sub.add_parser("eval-demo", help="classify images generated by the demo model")
    p.add_argument("--model", help="model directory (default: the embedded demo)")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, help="guidance scale of the guided run "
                   "(default: the model's)")
    p.add_argument("--grid-out", help="write a sample grid PNG (one row per class)")
    p.add_argument("--json-out", help="write the report as JSON")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the engine's dtype (the quality gate compares them)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=typing.get_args(KVCacheDType))
    p.add_argument("--compiled", action="store_true", help="vLLM's compiled model "
                   "(--no-enforce-eager)")
    p.add_argument("--lora", metavar="DIR", help="also measure a LoRA adapter: accuracy "
                   "with it, and its style (background brightness) against the base's")
    p.add_argument("--negative", action="append", metavar="CLASS=NEGATIVE",
                   help="also draw 10 x --per-class images of CLASS with and without NEGATIVE "
                   "in the unguided stream and report how they are classified (repeatable)")
    p.set_defaults(func=cmd_eval_demo)

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("lora", help="images/s with 0, 1 and 2 LoRA adapters in a batch, "
                         "against the engine with LoRA off")
    b.add_argument("--model", default="demo", help="demo (the embedded model and its dusk "
                   "adapter) or a zoo size with random weights (GPT-B, ...)")
    b.add_argument("--batch", type=int, default=16)
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    b.add_argument("--rank", type=int, default=16, help="rank of the random adapters")
    b.add_argument("--rounds", type=int, default=3, help="timed runs per case (best kept)")
    b.add_argument("--json-out", help="default: docs/bench_lora_<model>.json")
    b.add_argument("--markdown-out", default="docs/BENCHMARKS.md")
    b.set_defaults(func=cmd_bench_lora)

    b = bench.add_parser("offline", help="vLLM engine vs the reference loop, images/s")
    b.add_argument("--sizes", nargs="+", default=["tiny", "GPT-B"])
    b.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    b.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--task", default="c2i", choices=["c2i", "t2i"],
                   help="class- or text-conditional models (t2i: random caption features)")
    b.add_argument("--kv-cache-dtype", nargs="+", default=["auto"],
                   choices=typing.get_args(KVCacheDType), help="vLLM's KV cache dtype; "
                   "several: one engine after another, side by side in one run")
    b.add_argument("--image-size", type=int, default=256, help="256, or 384 for the seed's "
                   "A100 setting (printed beside each row: --batch-sizes 8 gives the ratio)")
    b.add_argument("--modes", nargs="+", default=["default"],
                   choices=["default", "eager", "compiled"], help="the model as the machine "
                   "runs it by default (GPU: compiled, CPU: eager), eager, or compiled by "
                   "vLLM (torch.compile); several: side by side in one run")
    b.add_argument("--json-out", help="default: docs/bench_offline.json (c2i), "
                   "docs/bench_offline_t2i.json (t2i)")
    b.add_argument("--markdown-out", default="docs/BENCHMARKS.md")
    b.set_defaults(func=cmd_bench_offline)
    for name, module, help_text in (
            ("serve", bench_serve, "load-test a running server (httpx, async)"),
            ("make-model", bench_models, "a random-weight model directory of a zoo size"),
            ("invariance", bench_invariance, "what batch-invariant decoding costs"),
            ("soak", bench_soak, "server and engine memory under 10 minutes of load"),
            ("sample", bench_sample, "llamagen sample (1 Ray actor) against generate"),
            ("signing", bench_signing, "C2PA signing time per image, by format and size"),
            ("decoder", bench_decoder, "VQ decode images/s against batch size")):
        b = bench.add_parser(name, help=help_text)
        module.add_arguments(b)
        b.set_defaults(func=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValidationError as e:
        print(f"llamagen: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except EngineDied as e:
        print(f"llamagen: error: {e}; exiting for a restart", file=sys.stderr)
        return 3
    except (UsageError, ConfigError, CheckpointError, SigningError, StoreUnavailable,
            ValueError, OSError) as e:
        print(f"llamagen: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

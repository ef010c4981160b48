"""Knowledge distillation: the ``distill`` section and the teacher the trainer runs beside the
student.

The teacher is our checkpoint (saved at any layout: it loads resharded into the student's
tensor-parallel size, as a resume does) or a Hugging Face folder (converted on the fly; with a
student at TP=1). It is built in the same ranks and process groups as the student, in the
student's precision, with no optimizer state and no gradient, and runs forward on each training
micro-batch; the student's loss mixes its cross entropy with the KL divergence from the teacher
(``model/distill_loss.py``), token-weighted like any loss. Validation reports the plain cross
entropy. Teacher and student must share a tokenizer (compared by vocabulary, refused naming both)
and a vocabulary size. The megatron engine only, one pipeline stage. Checkpoints and resume are
those of any run (the teacher is loaded again).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from gptforge.common.errors import ConfigError


@dataclass
class DistillConfig:
    teacher: str = ""
    """Knowledge distillation from this teacher: our checkpoint (a save directory or a step) or
    a Hugging Face folder; empty: no distillation."""
    alpha: float = 0.5
    """Weight of the soft term, alpha * T^2 * KL(teacher || student); the cross entropy gets
    1 - alpha."""
    temperature: float = 2.0
    """Softmax temperature T of both distributions in the soft term."""


def validate_distill(cfg: DistillConfig, parallel) -> None:
    if not cfg.teacher:
        return
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ConfigError("distill.alpha", f"must be in [0, 1], got {cfg.alpha}")
    if not cfg.temperature > 0.0:
        raise ConfigError("distill.temperature", f"must be > 0, got {cfg.temperature}")
    if parallel.engine != "megatron":
        raise ConfigError("distill.teacher", f"needs parallel.engine megatron, got "
                                             f"{parallel.engine!r}")
    if parallel.pipeline_model_parallel_size != 1:
        raise ConfigError("distill.teacher", "needs parallel.pipeline_model_parallel_size 1 "
                          "(the teacher runs beside each micro-batch's logits)")
    if not Path(cfg.teacher).exists():
        raise ConfigError("distill.teacher", f"no such checkpoint or folder: {cfg.teacher}")


# What the teacher is built with, from the student's: its layout but one stage, no sharded
# optimizer or overlap (it never steps), the megatron engine, nothing logged or sampled.
def _teacher_overrides(student) -> dict:
    p = student.parallel
    return {"parallel": {"engine": "megatron",
                         "tensor_model_parallel_size": p.tensor_model_parallel_size,
                         "pipeline_model_parallel_size": 1,
                         "virtual_pipeline_model_parallel_size": None,
                         "sequence_parallel": p.sequence_parallel,
                         "use_distributed_optimizer": False, "overlap_grad_reduce": False,
                         "overlap_param_gather": False, "recompute": "none", "zero_stage": 0,
                         "offload_optimizer": "none", "offload_param": "none"},
            "precision": asdict(student.precision), "train": asdict(student.train),
            "optim": asdict(student.optim),  # (never steps; checked as the student's was)
            "data": asdict(student.data), "sample": {"prompt": ""},
            "logging": {"mlflow": False}, "distill": {"teacher": ""}}


def _check_tokenizers(student_path: str, teacher_path: str, teacher_name: str) -> None:
    from gptforge.data import tokenizer

    if not student_path and not teacher_path:
        return  # mock data on both sides: the vocabulary sizes are compared
    if not student_path or not teacher_path:
        raise ConfigError("distill.teacher", f"student tokenizer {student_path or '(none)'} and "
                          f"teacher {teacher_name} tokenizer {teacher_path or '(none)'}: "
                          f"distillation needs one tokenizer on both sides")
    ours, theirs = tokenizer.load(student_path), tokenizer.load(teacher_path)
    if tokenizer.vocab_sha256(ours) != tokenizer.vocab_sha256(theirs):
        raise ConfigError("distill.teacher", f"student tokenizer {student_path} and teacher "
                          f"{teacher_name} tokenizer {teacher_path} differ (their vocabularies "
                          f"are not the same): distillation needs one tokenizer")


def _teacher_config(distill: DistillConfig, student):
    """(the teacher's Config, how to load its weights, its tokenizer path)."""
    from gptforge.launcher.config import config_from_dict, merge_dicts
    from gptforge.launcher.modelio.hf_folder import is_hf_folder, read_hf_folder

    overrides = _teacher_overrides(student)
    if is_hf_folder(distill.teacher):
        hf = read_hf_folder(distill.teacher)
        if student.parallel.tensor_model_parallel_size != 1:
            raise ConfigError("distill.teacher", f"{distill.teacher}: a Hugging Face folder "
                              f"teaches a TP=1 student; convert it first (gptforge convert "
                              f"from-hf), our checkpoint loads at any TP")
        cfg = config_from_dict(merge_dicts({"model": asdict(hf.model)}, overrides))
        return cfg, ("hf", hf), str(hf.path.resolve())
    from gptforge.launcher.modelio.recorded_tokenizer import find_tokenizer
    from gptforge.launcher.run.checkpoint import format as ck

    step_dir = ck.resolve(distill.teacher)
    manifest = ck.read_manifest(step_dir)
    tokenizer = find_tokenizer(step_dir, manifest)
    cfg = config_from_dict(merge_dicts({"model": manifest["config"]["model"]}, overrides))
    return cfg, ("ours", step_dir), str(tokenizer.found or tokenizer.recorded or "")


def _load_weights(engine, source, cfg, layout) -> None:
    kind, where = source
    if kind == "ours":
        from gptforge.launcher.run.checkpoint import format as ck

        engine.load(where / ck.STATE_DIR, load_optim=False)
        return
    from gptforge.model.hf_weights import from_hf, to_model_keys
    from gptforge.parallel.weights import gpt_state_dict, load_gpt_weights

    fresh = gpt_state_dict(engine.model_chunks[0])
    ours = from_hf(where.arch, where.state, cfg.model, layout.padded_vocab_size)
    load_gpt_weights(engine.model_chunks[0], to_model_keys(ours, fresh))
    engine.optimizer.reload_model_params()


def build_distiller(distill: DistillConfig, student, layout, ctx):
    """The teacher, loaded beside the student in this rank; None without a distill section."""
    import torch

    from gptforge.launcher.config import validate
    from gptforge.launcher.run.build import build_engine
    from gptforge.parallel.megatron.engine import Distiller
    from gptforge.parallel.seeding import rng_state, set_rng_state

    if not distill.teacher:
        return None
    cfg, source, teacher_tokenizer = _teacher_config(distill, student)
    _check_tokenizers(student.data.tokenizer_model, teacher_tokenizer, distill.teacher)
    if cfg.model.vocab_size != student.model.vocab_size:
        raise ConfigError("distill.teacher", f"teacher {distill.teacher} has model.vocab_size "
                          f"{cfg.model.vocab_size}, the student {student.model.vocab_size}")
    teacher_layout = validate(cfg, ctx.world_size)
    if teacher_layout.padded_vocab_size != layout.padded_vocab_size:
        raise ConfigError("distill.teacher", f"teacher {distill.teacher} pads its vocabulary to "
                          f"{teacher_layout.padded_vocab_size}, the student to "
                          f"{layout.padded_vocab_size} (model.make_vocab_size_divisible_by)")
    saved = rng_state()  # building a model draws random numbers; the student's run must not
    try:                 # see whether a teacher was built
        engine = build_engine(cfg, teacher_layout, ctx)
        _load_weights(engine, source, cfg, teacher_layout)
    finally:
        set_rng_state(saved)
    # only the model is kept: the engine's optimizer (never stepped, so holding no moments)
    # and its master copies go with the engine
    model = engine.model_chunks[0].eval()

    @torch.no_grad()
    def teacher(tokens, position_ids):
        return model(tokens, position_ids, None)

    return Distiller(teacher=teacher, alpha=distill.alpha, temperature=distill.temperature)

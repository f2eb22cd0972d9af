"""The vLLM teacher: prompt log-probs of whole sequences, converted to cache fields with numpy.

    python run_pipeline.py cache --config configs/demo.yaml teacher.backend=vllm

Positions follow the HF backend: position i holds the top-k for token i+1 and
target_logprob[i] = log p(x_{i+1} | x_<=i); the last position has a top-k but target 0.
vLLM's prompt log-probs are shifted by one (entry i is the distribution of token i given
tokens < i; entry 0 is empty), so prompt entry i+1 fills position i, and the last position
comes from ``logprobs=k`` on the one generated token.

With ``flat_logprobs=True`` every scored position holds exactly 1 + n entries: the actual
(or sampled) token first, then the top-n by descending probability (the actual token again
when it is in the top-n). That fixed width lets us reshape the flat lists into [T, 1 + n]
arrays, with no per-token Python loop (see vllm/logprobs.py and vllm/v1/engine/logprobs.py);
the numpy side, and why k entries are asked (not k + the vocabulary padding), is vllm_rows.py.

What vLLM cannot give (docs/vllm.md): the log-partition (we store the gauge logZ_1 = 0, so
only temperature 1 can be cached), sampled targets, and router probabilities. Routed expert
ids (GPU only) become an ids-only router cache.
"""

from __future__ import annotations

import os
import weakref

import numpy as np
import torch
# at module level: an import inside a method leaves importlib frames (and so the teacher) referenced
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.platforms import current_platform

from cache.schema import Sequences, TeacherRecord
from pipeline.config import ConfigError
from pipeline.models import check_model_dir, own_tokenizer_fingerprint, teacher_identity
from pipeline.router import num_experts as count_experts
from pipeline.teachers.base import TeacherBatch, TeacherConfig, resolve_dtype, router_layers
from pipeline.teachers.extract import ExtractSpec
from pipeline.teachers.vllm_rows import cache_fields, logprobs_asked, sequences_short_of_k

VLLM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def check_spec(spec: ExtractSpec) -> None:
    """Refuse what prompt log-probs cannot give (one-line ConfigErrors)."""
    if tuple(spec.temperatures) != (1.0,):
        raise ConfigError(f"cache.temperatures={list(spec.temperatures)} needs the log-partition at tau != 1, which "
                          f"vLLM cannot give; use cache.temperatures=[1.0] with teacher.backend=vllm, or the hf backend")
    if spec.wants_draws:
        raise ConfigError(f"cache.targets={spec.targets} needs the full next-token distribution at every position, "
                          f"which vLLM does not return; use cache.targets=topk with teacher.backend=vllm, or the hf backend")


def moe_layer_indices(config) -> list[int]:
    """Decoder layers with a routed MLP (Qwen's mlp_only_layers / decoder_sparse_step rule; all for others)."""
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return [i for i in range(config.num_hidden_layers) if i not in dense and (i + 1) % step == 0]


def resolve_routed_topk(setting: str, per_token: int) -> int:
    """vLLM returns the routed experts only (top num_experts_per_tok ids, no probabilities)."""
    if setting == "none" or per_token == 0:
        return 0
    if setting in ("all", "routed", str(per_token)):
        return per_token
    raise ConfigError(f"cache.router_topk={setting!r}: teacher.backend=vllm returns exactly the {per_token} routed "
                      f"experts per token; use 'all', 'routed', 'none' or {per_token}")


def engine_kwargs(cfg: TeacherConfig, num_logprobs: int, dtype: str, routed: bool) -> dict:
    kwargs = dict(model=cfg.path, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                  tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
                  max_num_batched_tokens=cfg.max_num_batched_tokens, max_model_len=cfg.max_model_len or None,
                  max_logprobs=num_logprobs, enable_prefix_caching=False,  # cached prefixes get no prompt log-probs
                  skip_tokenizer_init=True, seed=0)
    if routed:
        kwargs["enable_return_routed_experts"] = True
    return {**kwargs, **cfg.engine_kwargs}


def on_gpu() -> bool:
    return current_platform.is_cuda_alike()


class VLLMTeacher:
    def __init__(self, cfg: TeacherConfig, spec: ExtractSpec, device: torch.device):
        from transformers import AutoConfig

        check_spec(spec)
        check_model_dir(cfg.path)
        self.cfg, self.spec = cfg, spec
        self.config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
        text = self.config.get_text_config()
        self.vocab_size = text.vocab_size
        self.tokenizer_fingerprint = own_tokenizer_fingerprint(cfg.path)  # checked against the prepared data
        self.num_experts = count_experts(text)
        self.router_topk = self._router_topk(text, spec)
        self.teacher_moe_layers = moe_layer_indices(text) if self.router_topk else []
        self.moe_layers = router_layers(spec.router_layers, self.teacher_moe_layers) if self.router_topk else []
        self.router_has_probs = False  # vLLM never returns router probabilities: an ids-only router cache
        # k per position; a sequence where padding rows (ids >= vocab_limit) took top-k places is re-scored wider
        self.n_logprobs, self.n_logprobs_wide = logprobs_asked(spec.k, self.vocab_size, spec.vocab_limit)
        self.llm = self._engine(device)

    def _router_topk(self, text_config, spec: ExtractSpec) -> int:
        per_token = getattr(text_config, "num_experts_per_tok", 0) if self.num_experts else 0
        self.experts_per_token = per_token
        topk = resolve_routed_topk(spec.router_topk, per_token)
        if topk and not on_gpu():
            print("vllm teacher: routed expert ids need a GPU (enable_return_routed_experts) and router "
                  "probabilities need teacher.backend=hf; caching no router data", flush=True)
            return 0
        return topk

    def _engine(self, device: torch.device):
        if device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default is 4
        dtype = VLLM_DTYPES[resolve_dtype(self.cfg.dtype, device)]
        llm = LLM(**engine_kwargs(self.cfg, self.n_logprobs_wide, dtype, bool(self.router_topk)))  # the cap
        # stop the engine when the teacher goes at the latest (close() is the explicit way)
        self._shutdown = weakref.finalize(self, llm.llm_engine.engine_core.shutdown)
        self.params, self.params_wide = (
            SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=n, logprobs=n, detokenize=False,
                           flat_logprobs=True) for n in (self.n_logprobs, self.n_logprobs_wide))
        return llm

    def close(self) -> None:
        """Stop the engine now and free its memory (GPU memory the student stage will need)."""
        self._shutdown()

    def identity(self) -> dict:
        return {
            **teacher_identity(self.cfg.path, self.config),
            "teacher_backend": "vllm",  # log_partition and router fields differ from an hf cache
            "router_topk": self.router_topk,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "moe_layers": self.moe_layers,  # the stored ones (cache.router_layers)
            "teacher_moe_layers": self.teacher_moe_layers,
        }

    def score(self, batch: TeacherBatch) -> Sequences:
        lengths = batch.lengths.numpy()
        ids_BL = batch.input_ids.numpy()
        prompts = [TokensPrompt(prompt_token_ids=ids_BL[b, :n].tolist()) for b, n in enumerate(lengths)]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        outputs, widths = self._rescore_short(prompts, outputs)
        fields = cache_fields(outputs, self.spec.k, widths, self.spec.vocab_limit)
        if self.router_topk:
            fields["router_ids"] = self._routed(outputs, lengths)
        valid = np.arange(ids_BL.shape[1])[None, :] < lengths[:, None]
        return Sequences(sample_ids=batch.sample_ids.numpy(), seq_lens=lengths, input_ids=ids_BL[valid],
                         loss_mask=batch.loss_mask.numpy()[valid], teacher=TeacherRecord(**fields))

    def _rescore_short(self, prompts: list, outputs: list) -> tuple[list, list[int]]:
        """Sequences where padding ids took some of the k places, scored again with room for every padding id."""
        short = sequences_short_of_k(outputs, self.spec.k, self.n_logprobs, self.spec.vocab_limit)
        widths = [self.n_logprobs] * len(outputs)
        if short:
            wide = self.llm.generate([prompts[b] for b in short], self.params_wide, use_tqdm=False)
            for b, out in zip(short, wide):
                outputs[b], widths[b] = out, self.n_logprobs_wide
        return outputs, widths

    def _routed(self, outputs: list, lengths: np.ndarray) -> np.ndarray:
        """[T, L_moe, k_r] routed expert ids; vLLM gives [tokens, all layers, k_r] per request."""
        per_seq = [o.outputs[0].routed_experts[:n] for o, n in zip(outputs, lengths)]
        return np.concatenate(per_seq)[:, self.moe_layers]

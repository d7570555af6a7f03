"""Every transformers/peft internal the package implements or calls, checked against the installed releases.

These are not public APIs and change between minor releases (transformers 5.25 added keyword arguments to the
tensor-parallel style methods). A failure here names the internal and the installed versions: that release
changed something we depend on; adapt the call site (``hf_plugins/_compat.py`` holds version adapters) and widen
or narrow the supported range in ``pyproject.toml``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import peft
import pytest
import transformers

import hf_plugins

INSTALLED = f"transformers {transformers.__version__}, peft {peft.__version__}"
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _resolve(dotted: str):
    """``package.module:Attr.attr`` -> the object; a missing one fails with the internal's name and versions."""
    module_name, _, attributes = dotted.partition(":")
    try:
        target = importlib.import_module(module_name)
        for attribute in filter(None, attributes.split(".")):
            target = getattr(target, attribute)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"{INSTALLED}: the internal {dotted} is gone ({error}).")
    return target


def _binds(function, args: int, keywords: tuple[str, ...]) -> str | None:
    """Why ``function(*args placeholders, **keywords)`` would not bind, or None when it does."""
    try:
        inspect.signature(function).bind(*[None] * args, **dict.fromkeys(keywords))
    except TypeError as error:
        return f"{error} (signature {inspect.signature(function)})"
    return None


# How we call each internal: (internal, positional arguments, keyword names). Methods count ``self`` / ``ctx``.
CALLS = [
    ("transformers.distributed.tensor_parallel:apply_tensor_parallelism", 3, ()),
    ("transformers.distributed.tensor_parallel:TensorParallelLayer.shard_param", 4, ()),
    ("transformers.distributed.parallel_utils:_AllReduceBackward.forward", 3, ()),
    ("transformers.distributed.parallel_utils:_AllReduceForward.forward", 3, ()),
    ("transformers.distributed.parallel_utils:replace_layer_number_by_wildcard", 1, ()),
    ("transformers.distributed.parallel_utils:ALL_PARALLEL_STYLES.register", 2, ()),
    ("transformers.distributed.pipeline_parallel:PipelineIdentityLayer", 0, ()),
    ("transformers:PreTrainedModel._expand_parallel_plan", 2, ()),
    ("transformers:PreTrainedModel._from_config", 1, ()),
    ("transformers.quantizers.quantizers_utils:should_convert_module", 2, ()),
    ("transformers.integrations.sdpa_attention:sdpa_attention_forward", 5, ("dropout", "scaling")),
    ("transformers.models.llama.modeling_llama:apply_rotary_pos_emb", 4, ()),
    ("transformers.generation.stopping_criteria:StopStringCriteria", 2, ()),
    ("transformers.cache_utils:Cache", 0, ("layers",)),
    ("transformers.cache_utils:DynamicLayer", 0, ()),
    ("peft.tuners.lora.layer:LoraLayer.__init__", 2, ()),
    ("peft:LoraConfig._register_custom_module", 2, ()),
]


@pytest.mark.parametrize(("internal", "args", "keywords"), CALLS, ids=[c[0].rpartition(":")[2] for c in CALLS])
def test_internals_we_call_take_our_arguments(internal, args, keywords):
    problem = _binds(_resolve(internal), args, keywords)
    assert problem is None, f"{INSTALLED}: we call {internal} with {args} positional and {keywords} keyword " \
                            f"arguments, which no longer binds: {problem}"


# Internals used by name or isinstance (their constructors are not ours to call).
NAMES = [
    "transformers.models.auto.configuration_auto:CONFIG_MAPPING",
    "transformers.models.auto.modeling_auto:_LazyAutoMapping",
    "transformers.quantizers.auto:AUTO_QUANTIZATION_CONFIG_MAPPING",
    "transformers.quantizers.auto:AUTO_QUANTIZER_MAPPING",
    "transformers.masking_utils:sdpa_mask",
    "transformers.generation.stopping_criteria:EosTokenCriteria",
    "transformers.generation.stopping_criteria:MaxLengthCriteria",
    "transformers.generation.candidate_generator:CandidateGenerator",
    "transformers.cache_utils:CacheLayerMixin",
    "transformers.modeling_layers:GradientCheckpointingLayer",
]


@pytest.mark.parametrize("internal", NAMES, ids=[n.rpartition(":")[2] for n in NAMES])
def test_internals_we_name_exist(internal):
    _resolve(internal)


def test_tensor_parallel_styles_are_called_the_way_our_adapter_expects():
    """``_compat.shard_param`` passes ``config``/``mesh_manager`` exactly where the installed base takes them, and
    ``apply_tensor_parallelism`` calls ``install_forward`` with keywords our local styles accept."""
    base = _resolve("transformers.distributed.tensor_parallel:TensorParallelLayer")
    for method in ("shard_param", "install_forward"):
        keywords = tuple(p.name for p in inspect.signature(getattr(base, method)).parameters.values()
                         if p.kind is inspect.Parameter.KEYWORD_ONLY)
        assert set(keywords) <= {"config", "mesh_manager"}, (
            f"{INSTALLED}: TensorParallelLayer.{method} takes keywords {keywords}; hf_plugins/_compat.py and "
            "hf_plugins/parallel/local_styles.py pass or accept only config and mesh_manager."
        )


def test_custom_generate_receives_what_transformers_passes_a_decoding_method():
    """transformers calls a ``custom_generate`` callable like its ``_sample``: the parameters ``_sample``
    requires must be ours too, in order."""
    from hf_plugins.generation.loop import speculative_generate

    sample = _resolve("transformers:GenerationMixin._sample")
    required = [p.name for p in inspect.signature(sample).parameters.values()
                if p.kind in _POSITIONAL and p.default is inspect.Parameter.empty][1:]
    ours = [p.name for p in inspect.signature(speculative_generate).parameters.values() if p.kind in _POSITIONAL]
    assert ours[1 : 1 + len(required)] == required, (
        f"{INSTALLED}: GenerationMixin._sample takes {required} first; our custom_generate speculative_generate "
        f"takes {ours[1:]}."
    )


def test_speculative_output_is_still_a_generate_output():
    base = _resolve("transformers.generation.utils:GenerateDecoderOnlyOutput")
    fields = {f.name for f in dataclasses.fields(base)}
    assert {"sequences", "cache"} <= fields, (
        f"{INSTALLED}: GenerateDecoderOnlyOutput has fields {sorted(fields)}; SpeculativeGenerateOutput fills "
        "sequences and cache."
    )


def _our_subclasses_of_library_classes() -> list[type]:
    """Every class defined in hf_plugins with a transformers or peft class among its bases."""
    modules = [importlib.import_module(m.name) for m in pkgutil.walk_packages(hf_plugins.__path__, "hf_plugins.")]
    classes = {member for module in modules for member in vars(module).values()
               if inspect.isclass(member) and member.__module__ == module.__name__}
    return sorted(
        (cls for cls in classes
         if any(base.__module__.split(".")[0] in ("transformers", "peft") for base in cls.__mro__[1:])),
        key=lambda cls: f"{cls.__module__}.{cls.__qualname__}",
    )


def _accepts_every_call_of(ours, theirs) -> str | None:
    """Why a call that ``theirs`` accepts would fail on ``ours``, or None (both methods, ``self`` included)."""
    mine, base = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
    kinds = {p.kind for p in mine.values()}
    my_positional = [p for p in mine.values() if p.kind in _POSITIONAL]
    base_positional = [p for p in base.values() if p.kind in _POSITIONAL]
    if inspect.Parameter.VAR_POSITIONAL not in kinds and len(my_positional) < len(base_positional):
        return f"takes {len(my_positional)} positional arguments where the base takes {len(base_positional)}"
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        missing = [p.name for p in base.values()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY and (p.name not in mine or mine[p.name].kind
                                                                   not in _KEYWORD)]
        if missing:
            return f"does not take the base's keyword arguments {missing}"
    base_names = {p.name for p in base.values()}
    required_extra = [p.name for p in my_positional[len(base_positional):] + [
        p for p in mine.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        if p.default is inspect.Parameter.empty and p.name not in base_names]
    if required_extra:
        return f"requires {required_extra}, which the base's callers do not pass"
    return None


def _library_owner(cls: type, name: str) -> type | None:
    """The nearest transformers/peft base of ``cls`` that defines method ``name``; for ``__init__`` only where
    the library constructs the class itself (quantizers from a config), since we construct the others."""
    if name == "__init__" and not issubclass(cls, _resolve("transformers.quantizers:HfQuantizer")):
        return None
    library_bases = [base for base in cls.__mro__[1:] if base.__module__.split(".")[0] in ("transformers", "peft")]
    return next((base for base in library_bases if inspect.isfunction(vars(base).get(name))), None)


OVERRIDES = [
    (cls, name, owner)
    for cls in _our_subclasses_of_library_classes()
    for name, member in vars(cls).items()
    if inspect.isfunction(member) and (owner := _library_owner(cls, name)) is not None
]


@pytest.mark.parametrize(("cls", "name", "owner"), OVERRIDES, ids=[f"{c.__name__}.{n}" for c, n, _ in OVERRIDES])
def test_our_overrides_accept_every_call_the_library_makes(cls, name, owner):
    """A method we override on a transformers/peft class is called by the library with the base's signature."""
    theirs = vars(owner)[name]
    problem = _accepts_every_call_of(getattr(cls, name), theirs)
    assert problem is None, (
        f"{INSTALLED}: {cls.__module__}.{cls.__qualname__}.{name} overrides "
        f"{owner.__module__}.{owner.__qualname__}.{name} {inspect.signature(theirs)} but {problem}."
    )


def test_the_cache_preparation_we_wrap_still_takes_the_generation_config_and_model_kwargs_first():
    """KV4 models wrap ``_prepare_cache_for_generation`` to put a ``KV4Cache`` into ``model_kwargs["cache"]``."""
    prepare = _resolve("transformers:GenerationMixin._prepare_cache_for_generation")
    names = list(inspect.signature(prepare).parameters)[1:3]
    assert names == ["generation_config", "model_kwargs"], (
        f"{INSTALLED}: GenerationMixin._prepare_cache_for_generation{inspect.signature(prepare)}; "
        "hf_plugins/generation/kv4_cache.py wraps it expecting (generation_config, model_kwargs, ...)."
    )


def test_overrides_were_found():
    """The discovery above must see our known subclasses, or the override check would pass vacuously."""
    names = {f"{cls.__name__}.{name}" for cls, name, _ in OVERRIDES}
    assert {"LocalColwise.install_forward", "LocalRowwise.install_forward", "DraftModelCandidates.get_candidates",
            "KV4Layer.update", "KV4Layer.crop", "PackedLinearQuantizer._process_model_before_weight_loading"} <= names, \
        sorted(names)

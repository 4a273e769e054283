"""ONNX Runtime through its C API: ctypes over the `libonnxruntime` library that the onnxruntime wheel ships.

Why not the Python binding: only the C API can open a session with a *pre-packed weights container*. MLAS packs
every MatMulNBits weight into a private copy per session; with a container, the packed copies of the initializers
that sessions share (added with `AddInitializer`: attention, lm_head, embeddings of one base model) are made once
and reused by every later session, so a loaded character costs only its own FFN. The Python binding's sessions
cannot do that, and each character then held its own packed copy of the whole trunk (223 MB instead of ~70 MB).

What is here: `Env` (one per process: logging, optional global thread pool, the shared arena allocator), `Tensor`
(an OrtValue over a numpy array's memory, zero-copy), `Container`, `SessionSettings` and `Session` (open, input
names, `run` into preallocated outputs). The library is loaded without importing the onnxruntime Python package.
ctypes releases the GIL during every call, so sessions run in parallel from several threads.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from ctypes import POINTER, c_char_p, c_int, c_size_t, c_void_p
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The OrtApi function table up to API version 8, in ABI order (append-only across releases, so the positions hold for
# every later version; tests check ORT's own static_asserts: ReleaseCustomOpDomain 101, ReleaseModelMetadata 118,
# AddFreeDimensionOverrideByName 124, ReleaseAvailableProviders 126).
_TABLE = """
CreateStatus GetErrorCode GetErrorMessage CreateEnv CreateEnvWithCustomLogger EnableTelemetryEvents
DisableTelemetryEvents CreateSession CreateSessionFromArray Run CreateSessionOptions SetOptimizedModelFilePath
CloneSessionOptions SetSessionExecutionMode EnableProfiling DisableProfiling EnableMemPattern DisableMemPattern
EnableCpuMemArena DisableCpuMemArena SetSessionLogId SetSessionLogVerbosityLevel SetSessionLogSeverityLevel
SetSessionGraphOptimizationLevel SetIntraOpNumThreads SetInterOpNumThreads CreateCustomOpDomain CustomOpDomain_Add
AddCustomOpDomain RegisterCustomOpsLibrary SessionGetInputCount SessionGetOutputCount
SessionGetOverridableInitializerCount SessionGetInputTypeInfo SessionGetOutputTypeInfo
SessionGetOverridableInitializerTypeInfo SessionGetInputName SessionGetOutputName
SessionGetOverridableInitializerName CreateRunOptions RunOptionsSetRunLogVerbosityLevel
RunOptionsSetRunLogSeverityLevel RunOptionsSetRunTag RunOptionsGetRunLogVerbosityLevel
RunOptionsGetRunLogSeverityLevel RunOptionsGetRunTag RunOptionsSetTerminate RunOptionsUnsetTerminate
CreateTensorAsOrtValue CreateTensorWithDataAsOrtValue IsTensor GetTensorMutableData FillStringTensor
GetStringTensorDataLength GetStringTensorContent CastTypeInfoToTensorInfo GetOnnxTypeFromTypeInfo
CreateTensorTypeAndShapeInfo SetTensorElementType SetDimensions GetTensorElementType GetDimensionsCount
GetDimensions GetSymbolicDimensions GetTensorShapeElementCount GetTensorTypeAndShape GetTypeInfo GetValueType
CreateMemoryInfo CreateCpuMemoryInfo CompareMemoryInfo MemoryInfoGetName MemoryInfoGetId MemoryInfoGetMemType
MemoryInfoGetType AllocatorAlloc AllocatorFree AllocatorGetInfo GetAllocatorWithDefaultOptions
AddFreeDimensionOverride GetValue GetValueCount CreateValue CreateOpaqueValue GetOpaqueValue
KernelInfoGetAttribute_float KernelInfoGetAttribute_int64 KernelInfoGetAttribute_string
KernelContext_GetInputCount KernelContext_GetOutputCount KernelContext_GetInput KernelContext_GetOutput
ReleaseEnv ReleaseStatus ReleaseMemoryInfo ReleaseSession ReleaseValue ReleaseRunOptions ReleaseTypeInfo
ReleaseTensorTypeAndShapeInfo ReleaseSessionOptions ReleaseCustomOpDomain
GetDenotationFromTypeInfo CastTypeInfoToMapTypeInfo CastTypeInfoToSequenceTypeInfo GetMapKeyType GetMapValueType
GetSequenceElementType ReleaseMapTypeInfo ReleaseSequenceTypeInfo SessionEndProfiling SessionGetModelMetadata
ModelMetadataGetProducerName ModelMetadataGetGraphName ModelMetadataGetDomain ModelMetadataGetDescription
ModelMetadataLookupCustomMetadataMap ModelMetadataGetVersion ReleaseModelMetadata
CreateEnvWithGlobalThreadPools DisablePerSessionThreads CreateThreadingOptions ReleaseThreadingOptions
ModelMetadataGetCustomMetadataMapKeys AddFreeDimensionOverrideByName
GetAvailableProviders ReleaseAvailableProviders
GetStringTensorElementLength GetStringTensorElement FillStringTensorElement AddSessionConfigEntry CreateAllocator
ReleaseAllocator RunWithBinding CreateIoBinding ReleaseIoBinding BindInput BindOutput BindOutputToDevice
GetBoundOutputNames GetBoundOutputValues ClearBoundInputs ClearBoundOutputs TensorAt CreateAndRegisterAllocator
SetLanguageProjection SessionGetProfilingStartTimeNs SetGlobalIntraOpNumThreads SetGlobalInterOpNumThreads
SetGlobalSpinControl
AddInitializer CreateEnvWithCustomLoggerAndGlobalThreadPools SessionOptionsAppendExecutionProvider_CUDA
SessionOptionsAppendExecutionProvider_ROCM SessionOptionsAppendExecutionProvider_OpenVINO SetGlobalDenormalAsZero
CreateArenaCfg ReleaseArenaCfg
ModelMetadataGetGraphDescription SessionOptionsAppendExecutionProvider_TensorRT SetCurrentGpuDeviceId
GetCurrentGpuDeviceId
KernelInfoGetAttributeArray_float KernelInfoGetAttributeArray_int64 CreateArenaCfgV2 AddRunConfigEntry
CreatePrepackedWeightsContainer ReleasePrepackedWeightsContainer CreateSessionWithPrepackedWeightsContainer
CreateSessionFromArrayWithPrepackedWeightsContainer
""".split()
API_INDEX = {name: i for i, name in enumerate(_TABLE)}
API_VERSION = 8  # the table above ends with version 8; GetApi(8) is served by every later release

_P = c_void_p
# name -> (return type, argument types); OrtStatus* results are c_void_p and checked by `_call`.
_SIGNATURES = {
    "GetErrorMessage": (c_char_p, [_P]),
    "ReleaseStatus": (None, [_P]),
    "CreateEnv": (_P, [c_int, c_char_p, POINTER(_P)]),
    "CreateEnvWithGlobalThreadPools": (_P, [c_int, c_char_p, _P, POINTER(_P)]),
    "CreateThreadingOptions": (_P, [POINTER(_P)]),
    "SetGlobalIntraOpNumThreads": (_P, [_P, c_int]),
    "SetGlobalInterOpNumThreads": (_P, [_P, c_int]),
    "ReleaseThreadingOptions": (None, [_P]),
    "CreateCpuMemoryInfo": (_P, [c_int, c_int, POINTER(_P)]),
    "CreateArenaCfg": (_P, [c_size_t, c_int, c_int, c_int, POINTER(_P)]),
    "ReleaseArenaCfg": (None, [_P]),
    "CreateAndRegisterAllocator": (_P, [_P, _P, _P]),
    "CreateTensorWithDataAsOrtValue": (_P, [_P, _P, c_size_t, POINTER(ctypes.c_int64), c_size_t, c_int,
                                            POINTER(_P)]),
    "ReleaseValue": (None, [_P]),
    "CreateSessionOptions": (_P, [POINTER(_P)]),
    "SetIntraOpNumThreads": (_P, [_P, c_int]),
    "SetInterOpNumThreads": (_P, [_P, c_int]),
    "DisablePerSessionThreads": (_P, [_P]),
    "SetSessionGraphOptimizationLevel": (_P, [_P, c_int]),
    "AddSessionConfigEntry": (_P, [_P, c_char_p, c_char_p]),
    "AddInitializer": (_P, [_P, c_char_p, _P]),
    "ReleaseSessionOptions": (None, [_P]),
    "CreatePrepackedWeightsContainer": (_P, [POINTER(_P)]),
    "ReleasePrepackedWeightsContainer": (None, [_P]),
    "CreateSession": (_P, [_P, _P, _P, POINTER(_P)]),
    "CreateSessionWithPrepackedWeightsContainer": (_P, [_P, _P, _P, _P, POINTER(_P)]),
    "SessionGetInputCount": (_P, [_P, POINTER(c_size_t)]),
    "SessionGetInputName": (_P, [_P, c_size_t, _P, POINTER(c_char_p)]),
    "GetAllocatorWithDefaultOptions": (_P, [POINTER(_P)]),
    "AllocatorFree": (_P, [_P, _P]),
    "Run": (_P, [_P, _P, POINTER(c_char_p), POINTER(_P), c_size_t, POINTER(c_char_p), c_size_t, POINTER(_P)]),
    "ReleaseSession": (None, [_P]),
}
_ELEMENT_TYPES = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3, np.dtype(np.int32): 6,
                  np.dtype(np.int64): 7, np.dtype(np.float16): 10}
OPT_LEVELS = {"basic": 1, "extended": 2, "all": 99}  # GraphOptimizationLevel
_LOG_ERROR = 3  # OrtLoggingLevel ORT_LOGGING_LEVEL_ERROR: ORT's warnings would only clutter a game's console
_ARENA, _MEM_DEFAULT = 1, 0  # OrtArenaAllocator, OrtMemTypeDefault


class OrtError(RuntimeError):
    """An OrtStatus error from the C API, with ORT's message."""


def library_path() -> Path:
    """The C library inside the installed onnxruntime package (found without importing the Python binding)."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise OrtError("the onnxruntime package is not installed (pip install onnxruntime)")
    capi = Path(next(iter(spec.submodule_search_locations))) / "capi"
    for pattern in ("libonnxruntime.so*", "libonnxruntime*.dylib", "onnxruntime.dll"):
        found = sorted(capi.glob(pattern))
        if found:
            return found[0]
    raise OrtError(f"{capi}: no ONNX Runtime C library in the onnxruntime package")


class _Api:
    """The typed functions of one loaded library."""

    def __init__(self, path: Path) -> None:
        self.lib = ctypes.CDLL(str(path))
        self.lib.OrtGetApiBase.restype = POINTER(_P)
        base = self.lib.OrtGetApiBase()
        get_api = ctypes.CFUNCTYPE(POINTER(_P), ctypes.c_uint32)(base[0])
        get_version = ctypes.CFUNCTYPE(c_char_p)(base[1])
        self.version = get_version().decode()
        table = get_api(API_VERSION)
        if not table:
            raise OrtError(f"{path}: ONNX Runtime {self.version} does not serve C API version {API_VERSION}")
        for name, (restype, argtypes) in _SIGNATURES.items():
            setattr(self, name, ctypes.CFUNCTYPE(restype, *argtypes)(table[API_INDEX[name]]))

    def call(self, name: str, *args) -> None:
        """Call an OrtStatus-returning function; raise OrtError with ORT's message on failure."""
        status = getattr(self, name)(*args)
        if status:
            message = self.GetErrorMessage(status).decode(errors="replace")
            self.ReleaseStatus(status)
            raise OrtError(message)


def _path_arg(path: Path):
    return ctypes.c_wchar_p(str(path)) if os.name == "nt" else c_char_p(os.fsencode(path))  # ORTCHAR_T


class Env:
    """The process's ORT environment: created once, on first use, and never released (sessions need it)."""

    _lock = threading.Lock()
    _instance: "Env | None" = None

    def __init__(self, threads: int, global_pool: bool) -> None:
        self.api = _Api(library_path())
        self.ptr, self.global_pool, self.threads = _P(), global_pool, threads
        if global_pool:
            tp = _P()
            self.api.call("CreateThreadingOptions", ctypes.byref(tp))
            self.api.call("SetGlobalIntraOpNumThreads", tp, threads)
            self.api.call("SetGlobalInterOpNumThreads", tp, 1)
            self.api.call("CreateEnvWithGlobalThreadPools", _LOG_ERROR, b"npcforge", tp, ctypes.byref(self.ptr))
            self.api.ReleaseThreadingOptions(tp)
        else:
            self.api.call("CreateEnv", _LOG_ERROR, b"npcforge", ctypes.byref(self.ptr))
        self.cpu = _P()  # memory info of tensors over numpy arrays
        self.api.call("CreateCpuMemoryInfo", _ARENA, _MEM_DEFAULT, ctypes.byref(self.cpu))
        # One arena for every session (session.use_env_allocators=1): activations are not held once per session.
        cfg = _P()
        self.api.call("CreateArenaCfg", 0, -1, -1, -1, ctypes.byref(cfg))
        self.api.call("CreateAndRegisterAllocator", self.ptr, self.cpu, cfg)
        self.api.ReleaseArenaCfg(cfg)

    @classmethod
    def get(cls, threads: int, global_pool: bool) -> "Env":
        """The process's environment; the first call decides whether it has a global pool and its size."""
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls(threads, global_pool)
            return cls._instance


class Tensor:
    """An OrtValue over a numpy array's memory (no copy): ORT reads it as an input and writes it as an output.
    The array stays referenced as long as the value."""

    __slots__ = ("array", "ptr", "_api")

    def __init__(self, env: Env, array: np.ndarray) -> None:
        self.array, self.ptr, self._api = array, _P(), env.api
        if not array.flags.c_contiguous:
            raise ValueError("tensor memory must be C-contiguous")
        dtype = _ELEMENT_TYPES.get(array.dtype)
        if dtype is None:
            raise ValueError(f"no ONNX element type for numpy dtype {array.dtype}")
        shape = (ctypes.c_int64 * array.ndim)(*array.shape)
        env.api.call("CreateTensorWithDataAsOrtValue", env.cpu, _P(array.ctypes.data), array.nbytes, shape,
                     array.ndim, dtype, ctypes.byref(self.ptr))

    def __del__(self) -> None:
        if self.ptr:
            self._api.ReleaseValue(self.ptr)
            self.ptr = _P()


class Container:
    """A pre-packed weights container: the packed copies of shared initializers, made once for all sessions."""

    def __init__(self, env: Env) -> None:
        self._api, self.ptr = env.api, _P()
        env.api.call("CreatePrepackedWeightsContainer", ctypes.byref(self.ptr))

    def __del__(self) -> None:
        if self.ptr:
            self._api.ReleasePrepackedWeightsContainer(self.ptr)
            self.ptr = _P()


@dataclass
class SessionSettings:
    threads: int  # intra-op threads of this session (ignored under a global pool)
    optimization: str  # key of OPT_LEVELS
    prepacking: bool
    initializers: dict[str, Tensor]  # shared initializers by name; they must outlive the session
    container: Container | None  # where packed copies of the shared initializers are kept, if pre-packing


class Session:
    """One model. `run` takes inputs and preallocated outputs as Tensors, names in the same order."""

    def __init__(self, env: Env, path: Path, settings: SessionSettings) -> None:
        api, self._api, self.env, self.settings = env.api, env.api, env, settings
        self.ptr, opts = _P(), _P()
        api.call("CreateSessionOptions", ctypes.byref(opts))
        try:
            if env.global_pool:
                api.call("DisablePerSessionThreads", opts)
            else:
                api.call("SetIntraOpNumThreads", opts, settings.threads)
                api.call("SetInterOpNumThreads", opts, 1)
            api.call("SetSessionGraphOptimizationLevel", opts, OPT_LEVELS[settings.optimization])
            api.call("AddSessionConfigEntry", opts, b"session.use_env_allocators", b"1")
            api.call("AddSessionConfigEntry", opts, b"session.disable_prepacking",
                     b"0" if settings.prepacking else b"1")
            for name, value in settings.initializers.items():
                api.call("AddInitializer", opts, name.encode(), value.ptr)
            if settings.container is not None and settings.prepacking:
                api.call("CreateSessionWithPrepackedWeightsContainer", env.ptr, _path_arg(path), opts,
                         settings.container.ptr, ctypes.byref(self.ptr))
            else:
                api.call("CreateSession", env.ptr, _path_arg(path), opts, ctypes.byref(self.ptr))
        finally:
            api.ReleaseSessionOptions(opts)
        self.input_names = self._input_names()

    def _input_names(self) -> list[str]:
        api, count, alloc = self._api, c_size_t(), _P()
        api.call("SessionGetInputCount", self.ptr, ctypes.byref(count))
        api.call("GetAllocatorWithDefaultOptions", ctypes.byref(alloc))
        names = []
        for i in range(count.value):
            name = c_char_p()
            api.call("SessionGetInputName", self.ptr, i, alloc, ctypes.byref(name))
            names.append(name.value.decode())
            api.call("AllocatorFree", alloc, ctypes.cast(name, _P))
        return names

    @staticmethod
    def names(names: list[str]) -> ctypes.Array:
        """A C array of names, built once per signature by the caller."""
        return (c_char_p * len(names))(*(n.encode() for n in names))

    def run(self, in_names: ctypes.Array, inputs: list[Tensor], out_names: ctypes.Array,
            outputs: list[Tensor]) -> None:
        ins = (_P * len(inputs))(*(t.ptr for t in inputs))
        outs = (_P * len(outputs))(*(t.ptr for t in outputs))
        self._api.call("Run", self.ptr, None, in_names, ins, len(inputs), out_names, len(outputs), outs)

    def __del__(self) -> None:
        if self.ptr:
            self._api.ReleaseSession(self.ptr)
            self.ptr = _P()

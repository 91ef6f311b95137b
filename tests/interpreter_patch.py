"""Two costs of Triton's CPU interpreter that are pure bookkeeping, removed for the test run.

- Every call of a ``@triton.jit`` helper from inside a kernel re-patches triton.language
  (``interpreter._patch_lang``: ``inspect.getmembers`` over tl, tl.core, tl.math and tl.tensor),
  although the launch running the kernel has patched those modules already and restores them only
  when its grid is done. Our kernels call their helpers in loops: a T = 4096 test made 41K such
  calls, 78 of its 214 s under cProfile.
- ``interpreter._get_np_dtype`` builds a 20-entry dict on every call (250K calls, 12 s there).

``install()`` skips a helper's re-patch where the running launch (or an earlier helper of it) has
patched every language module the helper can see. It still patches a module the helper sees first
(tl.standard's helpers see tl.core, our kernels only tl); upstream never restores a helper's patch,
so that module stays patched for the rest of the launch either way. It also caches the dtype map.
Neither changes a value the kernels compute: the patched attributes are the same either way
(tests/test_interpreter_patch.py runs kernels both ways and compares bits). Where this Triton's
interpreter lacks the internals named here, ``install()`` leaves it alone (slower, still right).
"""
import inspect

_ACTIVE = {"langs": None}   # ids of the language modules patched in the running launch; None outside a launch
_ORIGINAL = {}              # the interpreter's own functions while installed
COUNTS = {"real_patches": 0, "skipped_patches": 0}


def installed():
    return bool(_ORIGINAL)


def install():
    """Patches the interpreter; returns whether it is patched."""
    if _ORIGINAL:
        return True
    try:
        from triton.runtime import interpreter as itp
        import triton.language as tl
    except ImportError:
        return False
    real_patch, real_np_dtype = getattr(itp, "_patch_lang", None), getattr(itp, "_get_np_dtype", None)
    if real_patch is None or real_np_dtype is None or not hasattr(itp, "_LangPatchScope"):
        return False
    visible = {}   # keyed by the function itself (the jit'd functions live as long as their modules)

    def langs_of(fn):
        if fn not in visible:
            visible[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                    if inspect.ismodule(v) and (v is tl or v is tl.core))
        return visible[fn]

    def patch_lang(fn):
        langs = langs_of(fn)
        if _ACTIVE["langs"] is not None and langs <= _ACTIVE["langs"]:
            COUNTS["skipped_patches"] += 1
            return itp._LangPatchScope()     # nothing patched, nothing to restore
        COUNTS["real_patches"] += 1
        scope = real_patch(fn)
        if _ACTIVE["langs"] is not None:     # a helper that sees more: its patch is never restored upstream
            _ACTIVE["langs"] = _ACTIVE["langs"] | langs
            return scope
        _ACTIVE["langs"] = langs             # a launch's own patch, restored when its grid is done
        restore = scope.restore

        def restore_and_close():
            _ACTIVE["langs"] = None
            restore()
        scope.restore = restore_and_close
        return scope

    np_dtypes = {}

    def np_dtype(tt_dtype):
        # a block type maps as its element type does (block types are not hashable)
        key = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        try:
            return np_dtypes[key]
        except KeyError:
            np_dtypes[key] = out = real_np_dtype(tt_dtype)
            return out
        except TypeError:                    # an unhashable dtype: the interpreter's own path
            return real_np_dtype(tt_dtype)

    _ORIGINAL.update(_patch_lang=real_patch, _get_np_dtype=real_np_dtype)
    itp._patch_lang, itp._get_np_dtype = patch_lang, np_dtype
    return True


def uninstall():
    """Puts the interpreter's own functions back (between launches only)."""
    if not _ORIGINAL:
        return
    from triton.runtime import interpreter as itp
    for name, fn in _ORIGINAL.items():
        setattr(itp, name, fn)
    _ORIGINAL.clear()
    _ACTIVE["langs"] = None

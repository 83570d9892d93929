"""What a contributor runs on the kernels, for every registered family (nbflash.impls):

- ``compilecheck``: compile for sm_90 without a GPU, the compiler's resource report, and the
  PTX (normalized, to compare before and after a change) — ``python -m nbflash compile``;
- ``sass``: the SASS the driver compiles on the GPU — ``python -m nbflash sass``;
- ``sanitize``: compute-sanitizer memcheck and racecheck on the GPU — ``python -m nbflash
  sanitize``.
"""


def impls_argument(parser):
    """The --impls option of the devtools' verbs: some of the registered impls with kernels."""
    from .. import impls  # noqa: PLC0415
    parser.add_argument("--impls", nargs="+", choices=[i.name for i in impls.kernels()],
                        default=None, help="default: every impl with kernels")

"""mpitp: tensor-parallel transformer inference in NumPy and MPI, as a readable reference.

Library use::

    from mpitp import comm, load_model, generate_sequence
    model = load_model("path/to/hf-model", comm.world(), dtype="float64")
    result = generate_sequence(model, [15, 7, 201], max_new_tokens=20)
"""

__version__ = "0.1.0"

# None of these imports mpi4py.MPI: MPI starts with the first communicator asked of mpitp.comm.
from .errors import CheckpointError, ConfigError, MpitpError, RequestError, ShardingError  # noqa: F401
from .generation import Generation, generate_batch, generate_sequence  # noqa: F401
from .model import Model, load_model  # noqa: F401
from .sampling import Sampler  # noqa: F401
from .trace import Trace  # noqa: F401

"""Import for its check: exit with one line (status 2) unless the experiments' data stack and
torch/transformers are installed. Scripts import it before their first heavy import."""

from experiments.common.deps import CORE, TORCH, require_extras

require_extras(*CORE, *TORCH)

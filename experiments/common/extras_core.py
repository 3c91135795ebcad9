"""Import for its check: exit with one line (status 2) unless the experiments' data stack is
installed. Scripts import it before their first heavy import, so ``--help`` is covered too."""

from experiments.common.deps import CORE, require_extras

require_extras(*CORE)

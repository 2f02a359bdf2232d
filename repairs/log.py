"""The one logger of the repairs, and `warn_once` for repairs that mend instances.

Every repair logs at WARNING, naming what it repaired, through this logger: its name is the
package's (`repairs` here; in a saved folder, the folder's module package), so a test or a user
listens to all the repairs in one place.
"""

import logging

logger = logging.getLogger(__package__ or __name__)

# Repairs 7, 8 and 11 mend instances (each load); a user reads of each repair once per process, as of
# the repairs that patch a class once.
_warned = set()


def warn_once(message, cls, *args):
    """Log ``message`` (%-formatted with ``cls``'s name and ``args``) once per message and class name:
    the same repair of a second folder's copy of a class reads the same, so it is said once."""
    key = (message, cls.__name__)
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, cls.__name__, *args)

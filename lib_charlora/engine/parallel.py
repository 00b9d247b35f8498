"""Data parallel training, as the trainer sees it: every process draws the same random numbers for the
whole batch and computes its share of it; the gradients are summed across processes, so the update is
the one a single process makes with the same global batch. The command line supplies an implementation
over ``accelerate`` (``lib_charlora/distributed.py``); ``SINGLE`` is one process.
"""


class Single:
    """One process: every position of every batch, nothing to exchange."""

    world = 1
    rank = 0
    is_main = True
    is_local_main = True

    def positions(self, n):
        """This process's share of a batch of ``n`` (positions in the batch)."""
        return list(range(self.rank, n, self.world))

    def sum(self, tensor):
        """``tensor`` summed over all processes (returned; the input may be reused)."""
        return tensor

    def barrier(self):
        pass

    def any(self, flag):
        """True on every process when ``flag`` is true on any (a stop must happen at the same step)."""
        return bool(flag)


SINGLE = Single()

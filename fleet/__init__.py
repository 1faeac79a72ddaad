"""fleet: host-side tools that talk to the fleet (registry, push, collector, status) and
the ``edgectl`` program that fronts every host command."""

# SPDX-License-Identifier: Apache-2.0
"""Reverse mode, [Alg.1 L4]-[Alg.1 L15]: the memory plan, the tape, the checkpoint schedules and the sweep.

One module per job; :func:`gimli_bptt.reverse.hypergradient.reverse_hypergradient` puts them
together for one meta step:

- :mod:`~gimli_bptt.reverse.plan`: the budget of this meta step, the bytes of one state, and
  the plan the tape is given (which schedule of the states, how many bytes for graphs);
- :mod:`~gimli_bptt.reverse.schedules`: the checkpoint schedules (store-all, every-k, binomial)
  as operation lists; :mod:`~gimli_bptt.reverse.schedule_costs`: their simulator and closed forms;
- :mod:`~gimli_bptt.reverse.meter`: the bytes of one step's gradient graph, and ``TapeStats``;
- :mod:`~gimli_bptt.reverse.tape`: the forward tape (L4-L7), the executor of a schedule;
- :mod:`~gimli_bptt.reverse.sweep`: the reverse sweep (L8-L15) and line 9.

The plan, the schedules and the meter never import the tape: they plan and measure, the tape
executes. The tape and the sweep step the optimizer through the inner problem
(``InnerProblem.step``/``step_vjp``) and take the second-order terms from :mod:`gimli_bptt.hvp`;
they know no kernel and no task dimension. This package imports nothing itself, so that its
modules load only when used.
"""

"""OTP-style supervision for pykka actors: supervisors, restart strategies, restart
intensity, monitors and a name registry that follows restarts.

Generic: this package imports nothing from erllama. See docs/internals/supervision.md.
"""

from supervision._actor import Actor, Down, ExitReason, MonitorRef, demonitor, exit_reason, monitor
from supervision._intensity import RestartWindow
from supervision._registry import NameNotFound, NameTaken, NameUnavailable, Registry, registry
from supervision._spec import (
    BRUTAL_KILL,
    INFINITY,
    AutoShutdown,
    ChildSpec,
    ChildType,
    Restart,
    Shutdown,
    Strategy,
    SupFlags,
)
from supervision._supervisor import (
    ChildInfo,
    ChildStatus,
    RestartIntensityExceeded,
    StartError,
    SupervisionError,
    Supervisor,
    SupervisorStatus,
    count_children,
    delete_child,
    inspect,
    restart_child,
    start_child,
    start_supervisor,
    stop_supervisor,
    terminate_child,
    which_children,
)

__all__ = [
    "BRUTAL_KILL",
    "INFINITY",
    "Actor",
    "AutoShutdown",
    "ChildInfo",
    "ChildStatus",
    "ChildSpec",
    "ChildType",
    "Down",
    "ExitReason",
    "MonitorRef",
    "NameNotFound",
    "NameTaken",
    "NameUnavailable",
    "Registry",
    "Restart",
    "RestartIntensityExceeded",
    "RestartWindow",
    "Shutdown",
    "StartError",
    "Strategy",
    "SupFlags",
    "SupervisionError",
    "Supervisor",
    "SupervisorStatus",
    "count_children",
    "delete_child",
    "demonitor",
    "exit_reason",
    "inspect",
    "monitor",
    "registry",
    "restart_child",
    "start_child",
    "start_supervisor",
    "stop_supervisor",
    "terminate_child",
    "which_children",
]

"""``ros2 launch xvr_ros intraop.launch.py [config:=FILE] [namespace:=NS] [device:=cpu|cuda] [only:=a,b]``

Starts the xvr_ros nodes as separate processes on a real ROS 2 install. The node list and each
node's parameters come from :mod:`xvr_ros.ros.bringup` (``NODES`` and ``plan``): the same
definition and the same parameters file that ``python -m xvr_ros.ros.bringup`` runs in one
process, so both start exactly the same system.

``launch`` and ``launch_ros`` are imported inside the functions: this file can be imported (and
tested with stand-ins) where they are not installed.
"""

from __future__ import annotations


def _nodes(context, *args, **kwargs):
    """Resolve the launch arguments and build one ``launch_ros.actions.Node`` per node spec."""
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    from xvr_ros.ros.bringup import PACKAGE, plan

    config = LaunchConfiguration("config").perform(context)
    namespace = LaunchConfiguration("namespace").perform(context)
    device = LaunchConfiguration("device").perform(context)
    only = LaunchConfiguration("only").perform(context)
    return [
        Node(
            package=PACKAGE,
            executable=spec.executable,
            name=spec.name,
            namespace=namespace.strip("/"),
            parameters=[params],
            output="screen",
            emulate_tty=True,
        )
        for spec, params in plan(config or None, namespace=namespace, device=device or None, only=only or None)
    ]


def generate_launch_description():
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    from launch import LaunchDescription
    from xvr_ros.ros.bringup import NODES, default_config_path

    return LaunchDescription([
        DeclareLaunchArgument("config", default_value=str(default_config_path()),
                              description="ROS 2 parameters file for the nodes (config/intraop.yaml)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace for all nodes"),
        DeclareLaunchArgument("device", default_value="",
                              description="torch device for every node (cpu, cuda, ...); empty = from the config"),
        DeclareLaunchArgument("only", default_value="",
                              description="comma-separated subset of " + ",".join(s.name for s in NODES)),
        OpaqueFunction(function=_nodes),
    ])

"""rclpy glue over ``xvr_ros.core``: conversions, the three nodes, and the in-process bringup."""

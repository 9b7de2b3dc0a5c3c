"""Core of xvr_ros: pure torch + numpy, no ROS imports below this package."""

#!/bin/sh
# One line: the machine this container runs on, and how its image was built.
echo "hello from $(uname -m) (built as $(cat /etc/hello/target-platform) on $(cat /etc/hello/built-on))"

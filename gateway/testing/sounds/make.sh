#!/usr/bin/env bash
# Regenerates the WAVs shipped with gateway.testing (the demo's voices): 8 kHz mono 16-bit, trimmed.
# Needs espeak-ng and sox (Debian: apt-get install espeak-ng sox). Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

say() {  # say NAME VOICE PITCH TEXT
  espeak-ng -v "$2" -p "$3" -s 175 -w "$work/$1.wav" "$4"
  # 8 kHz mono 16-bit, leading and trailing silence cut.
  sox "$work/$1.wav" -r 8000 -c 1 -b 16 "$work/$1-8k.wav" \
    silence 1 0.02 0.5% reverse silence 1 0.02 0.5% reverse
}

say greeting en-us 50 "Hello, this is the demo agent. How can I help?"
say answer en-us 50 "Thanks, I heard you. I'm a local stand-in for Ultravox. With your own key, your agent answers here."
say caller en-gb 65 "Hi, I'd like to book a table for two, please."

cp "$work/greeting-8k.wav" greeting.wav
cp "$work/answer-8k.wav" answer.wav
# The caller listens to the greeting first (3.6 s), then speaks, then pauses so the agent answers.
sox "$work/caller-8k.wav" caller.wav pad 3.6 0.6

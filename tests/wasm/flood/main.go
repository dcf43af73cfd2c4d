// flood prints 64 KiB lines forever.
package main

import (
	"bytes"
	"os"
)

func main() {
	line := append(bytes.Repeat([]byte("x"), 64<<10), '\n')
	for {
		if _, err := os.Stdout.Write(line); err != nil {
			os.Exit(1)
		}
	}
}

// alloc keeps allocating 4 MiB blocks until its memory runs out.
package main

import "fmt"

func main() {
	var blocks [][]byte
	for i := 0; ; i++ {
		block := make([]byte, 4<<20)
		for j := range block {
			block[j] = byte(i + j)
		}
		blocks = append(blocks, block)
		if i%64 == 0 {
			fmt.Println("allocated", len(blocks)*4, "MiB")
		}
	}
}

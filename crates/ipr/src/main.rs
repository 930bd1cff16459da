fn main() {
    println!("ipr: under construction");
}

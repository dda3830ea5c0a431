//! The info protocol: newline-separated command names in, `command\tvalue\n` lines out.

/// The commands of an info request (empty lines dropped).
pub fn parse_request(body: &[u8]) -> Vec<&str> {
    body.split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| std::str::from_utf8(line).unwrap_or("<invalid utf-8>"))
        .collect()
}

/// The name part of a command (`name:args`, `name/arg` → `name`).
pub fn command_name(command: &str) -> &str {
    command.split([':', '/', ';']).next().unwrap_or(command)
}

/// Appends one answer line: the command exactly as received, TAB, value, LF.
pub fn put_answer(buf: &mut Vec<u8>, command: &str, value: &str) {
    buf.extend_from_slice(command.as_bytes());
    buf.push(b'\t');
    buf.extend_from_slice(value.as_bytes());
    buf.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_names() {
        assert_eq!(parse_request(b"node\nbuild\n\n"), vec!["node", "build"]);
        assert_eq!(command_name("namespace/test"), "namespace");
        assert_eq!(command_name("user-agent-set:value=abc"), "user-agent-set");
        let mut out = Vec::new();
        put_answer(&mut out, "node", "BB9");
        assert_eq!(out, b"node\tBB9\n");
    }
}
